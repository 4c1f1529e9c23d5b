"""The CLI is generated from the experiments' config dataclasses (issue 22): every option of a command is a
field of its config, with the field's default, help and checks; booleans are plain flags; one vocabulary."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from iclgd.cli import _default_of, _flat, _text, app
from iclgd.core import options as O
from iclgd.core.errors import IclgdError
from iclgd.experiments import compare, eval, sweep
from iclgd.experiments.protocol import experiments

# every declared experiment is a command whose options are its config's fields (and reproduce, the sweep)
CONFIGS = {**{name: e.config for name, e in experiments().items()}, "reproduce": sweep.SweepConfig}
EXTRAS = {"out", "overwrite", "shard", "data_dir", "json_out", "fmt"}  # run options, not the experiment's configuration


def _command(path: str):
    cmd = get_command(app)
    for part in path.split():
        cmd = cmd.commands[part]
    return cmd


@pytest.mark.parametrize("path", list(CONFIGS))
def test_every_option_is_a_config_field_with_its_default_and_help(path):
    cfg = CONFIGS[path]
    fields = {name: (f, m) for name, f, m in _flat(cfg)}
    params = {p.name: p for p in _command(path).params if not p.name.endswith("__old")}
    assert set(params) - (EXTRAS - set(fields)) == set(fields), path
    for name, (f, m) in fields.items():
        p = params[name]
        assert p.opts[0] == O.flag_of(f) or p.opts[0].startswith(O.flag_of(f) + "/"), (path, name, p.opts)
        assert p.help.startswith(m["help"]), (path, name)
        want = _text(_default_of(f))
        assert p.default == (None if want is dataclasses.MISSING else want) or p.required, (path, name, p.default)
        if isinstance(_default_of(f), bool):
            assert p.is_flag, (path, name)  # a plain flag (--x, or --x/--no-x when on by default), never --x true


def test_the_config_default_is_the_default_run(tmp_path, data_dir):
    """`iclgd eval` with no options records the EvalJob defaults (but for the model, given): one home per default."""
    res = CliRunner().invoke(app, ["eval", "--model", "tiny-random-llama", "--n-test", "2", "--data-dir",
                                   str(data_dir), "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "results.json").read_text())
    got = doc["config"]
    # the default separator differs from the paper's '</s>' token: recorded as a deviation, as docs/eval.md says
    assert "separator after each demonstration: '\\n' (the paper's code: the '</s>' token)" in doc["deviations"]
    job = eval.EvalJob()
    assert got["seeds"] == job.seeds and got["k"] == job.eval.k and got["max_len"] == job.eval.max_len
    assert got["batch_size"] == job.eval.batch_size and got["separator"] == job.eval.separator


def test_python_and_cli_validate_alike():
    """A value refused at the terminal is refused from Python with the same one-line message."""
    res = CliRunner().invoke(app, ["compare", "--model", "tiny-random-llama", "--kendall-n", "0"])
    assert res.exit_code == 2
    with pytest.raises(IclgdError) as e:
        compare.CompareConfig(kendall_n=0)
    assert f"error: {e.value}" in res.output
    with pytest.raises(IclgdError, match="--ft-mode 'sgd': expected one of gd, lcgd"):
        compare.CompareConfig(ft_mode="sgd")
    with pytest.raises(IclgdError, match="--seeds 1,1: seed 1 appears twice"):
        eval.EvalJob(seeds="1,1")


def test_untrained_control_is_on_by_default_in_compare_and_reproduce():
    assert compare.CompareJob().untrained is True and sweep.SweepConfig().untrained is True
    for path in ("compare", "reproduce"):
        p = next(p for p in _command(path).params if p.name == "untrained")
        assert p.default is True and "--no-untrained" in p.secondary_opts


def test_choices_are_listed_in_help():
    helps = {p.name: p.help for p in _command("compare").params}
    assert "one of: kv, all" in helps["ft_params"] and "one of: gd, lcgd" in helps["ft_mode"]
    res = CliRunner().invoke(app, ["compare", "--help"])
    assert res.exit_code == 0 and "<bool>" not in res.output  # flags, --help included, show no value type


def test_world_train_runs_on_the_device_given_and_records_it(tmp_path):
    res = CliRunner().invoke(app, ["world", "train", "--size", "tiny", "--steps", "2", "--device", "cpu",
                                   "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "final.json").read_text())["device"] == "cpu" and "on cpu" in res.output


def test_world_tasks_takes_out_like_every_command(tmp_path):
    res = CliRunner().invoke(app, ["world", "tasks", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "tasks" / "world-0.json").is_file()
    res = CliRunner().invoke(app, ["world", "tasks", str(tmp_path), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "give the folder once" in res.output


def test_every_experiment_declares_one_protocol():
    """Each experiment: a config dataclass, a run function, a Result class with a kind; the sweep's unit kinds are
    the union of what the experiments declare (nothing typed twice)."""
    exps = experiments()
    assert len(exps) == 10
    for name, e in exps.items():
        assert dataclasses.is_dataclass(e.config) and callable(e.run) and e.result.kind, name
        assert list(inspect.signature(e.run).parameters)[:4] == [list(inspect.signature(e.run).parameters)[0], "out",
                                                                 "overwrite", "progress"], name
    kinds = sweep.unit_kinds()
    assert set(kinds) == {"compare", "mechanisms", "zsl", "icl", "dual", "synthetic", "momentum", "world-train",
                          "world-compare", "world-ckpt"}
    assert all(callable(k.run) and k.cost({}) >= 0 for k in kinds.values())


def test_a_bug_is_one_line_with_the_traceback_in_a_log(tmp_path, monkeypatch):
    """The top-level handler (issue 24): an unexpected exception is one error line saying it is a bug and where the
    full traceback went, exit status 1; never a traceback (nor a second one) on screen."""
    from iclgd.experiments import protocol

    exp = experiments()["eval"]

    def boom(*a, **k):
        raise RuntimeError("something internal broke")

    from iclgd import cli

    monkeypatch.setitem(cli.EXP, "eval", protocol.Experiment(exp.name, exp.config, boom, exp.result, exp.units))
    monkeypatch.setenv("ICLGD_CACHE", str(tmp_path / "cache"))
    res = CliRunner().invoke(app, ["eval", "--model", "tiny-random-llama", "--n-test", "2"])
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and "Traceback" not in res.output
    assert "RuntimeError: something internal broke" in lines[0] and "this is a bug in iclgd" in lines[0]
    logs = list((tmp_path / "cache" / "logs").glob("iclgd-bug-*.log"))
    assert len(logs) == 1 and str(logs[0]) in lines[0]
    text = logs[0].read_text()
    assert "Traceback" in text and "RuntimeError: something internal broke" in text
