"""Properties of the CLI on generated input (issue 16): exit status 0 or 2, never a traceback, no partial
file, nothing earlier overwritten; help text on every option; usage errors in the one-line form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.main import get_command
from typer.testing import CliRunner

from iclgd.cli import app

SETTINGS = settings(max_examples=6, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SENTINEL = '{"kind": "iclgd.eval", "earlier": true}\n'


def _invoke(args: list[str]):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code in (0, 2), (args, res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output, (args, res.output)
    if res.exit_code == 2:
        errors = [x for x in res.output.splitlines() if x.startswith("error: ")]
        assert len(errors) == 1, (args, res.output)
    return res


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _commands():
    root = get_command(app)
    stack = [(name, cmd) for name, cmd in root.commands.items()]
    while stack:
        name, cmd = stack.pop()
        if hasattr(cmd, "commands"):
            stack += [(f"{name} {n}", c) for n, c in cmd.commands.items()]
        else:
            yield name, cmd


def test_every_option_has_help():
    lacking = [f"{name} {'/'.join(p.opts)}" for name, cmd in _commands() for p in cmd.params
               if getattr(p, "help", None) is None and p.param_type_name == "option"]
    lacking += [f"{name} {p.name}" for name, cmd in _commands() for p in cmd.params
                if p.param_type_name == "argument" and not getattr(p, "help", None)]
    assert not lacking, lacking


@pytest.mark.parametrize("args", [["eval", "--nope"], ["eval", "--k", "x"], ["pretrain"], ["evaluate"],
                                  ["momentum", "apply", "--eta"], ["dual", "verify", "--k", "1.5"]])
def test_usage_errors_are_one_line(args):
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "╭" not in res.output, res.output


def test_no_progress_bars_off_a_terminal(tmp_path):
    args = ["eval", "--model", "tiny-random-llama", "--n-test", "2", "--k", "1"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0 and "it/s" not in res.output and "\r" not in res.output, res.output
    res = CliRunner().invoke(app, ["--quiet", *args])
    assert res.exit_code == 0 and "it/s" not in res.output, res.output


@SETTINGS
@given(k=st.integers(-2, 3), seed=st.integers(-2, 3), batch=st.integers(-2, 3), n_test=st.integers(-1, 2),
       dtype=st.sampled_from(["float32", "float64", "bfloat16", "int8", ""]),
       device=st.sampled_from(["cpu", "cuda", "gpu", "cuda:0"]), overwrite=st.booleans())
def test_eval_options_never_crash_never_overwrite(tmp_path, k, seed, batch, n_test, dtype, device, overwrite):
    out = tmp_path / f"o{k}{seed}{batch}{n_test}{dtype}{device}{overwrite}"
    out.mkdir()
    (out / "results.json").write_text(SENTINEL)
    before = _files(out)
    res = _invoke(["eval", "--model", "tiny-random-llama", "--k", k, "--seed", seed, "--batch-size", batch,
                   "--n-test", n_test, "--dtype", dtype, "--device", device, "--out", out,
                   *(["--overwrite"] if overwrite else [])])
    after = {n: b for n, b in _files(out).items() if not n.startswith(".iclgd-")}
    assert not [n for n in after if ".tmp" in n]
    if res.exit_code == 2 or not overwrite:
        assert after == before  # nothing earlier overwritten, no partial file
    else:
        doc = json.loads(after["results.json"])
        assert doc["config"]["dtype"] == dtype and doc["config"]["device"] == device
        assert all(0 <= r["acc_icl"] <= 1 for r in doc["results"])  # never NaN accuracies


_WORDS = st.one_of(st.lists(st.sampled_from(["bad", "good", "ok", ""]), max_size=3), st.text(max_size=5),
                   st.integers())
_TEMPLATES = st.sampled_from(["Review: {sentence} Sentiment:", "{sentence", "no placeholder", "{0} x", "{}",
                              "}{", "{sentence}{sentence}", "{sentence!r}", "{sentence:>5}", "x {other} y"])


@SETTINGS
@given(template=_TEMPLATES, words=_WORDS, name=st.sampled_from(["mine", 3, None, ""]),
       garbage=st.binary(max_size=8), utf8=st.booleans())
def test_task_specs_never_crash(tmp_path, data_dir, template, words, name, garbage, utf8):
    doc = {"name": name, "template": template, "label_words": words, "demo_file": str(data_dir / "sst2" / "glue_train.jsonl"),
           "eval_file": str(data_dir / "sst2" / "dev.jsonl")}
    spec = tmp_path / "spec.json"
    spec.write_bytes(json.dumps(doc).encode() + (b"" if utf8 else garbage))
    _invoke(["eval", "--model", "tiny-random-llama", "--k", "1", "--n-test", "1", "--task-spec", spec])


@SETTINGS
@given(lines=st.lists(st.one_of(
    st.fixed_dictionaries({"text": st.one_of(st.text(max_size=6), st.none(), st.integers()),
                           "label": st.one_of(st.integers(-1, 2), st.none(), st.booleans(), st.text(max_size=1))}),
    st.sampled_from([[], 1, "x", None])), min_size=0, max_size=4), junk=st.binary(max_size=6))
def test_data_files_never_crash(tmp_path, lines, junk):
    d = tmp_path / "data" / "sst2"
    d.mkdir(parents=True, exist_ok=True)
    (d / "glue_train.jsonl").write_text('{"text": "fine", "label": 0}\n{"text": "nice", "label": 1}\n')
    (d / "dev.jsonl").write_bytes("".join(json.dumps(x) + "\n" for x in lines).encode() + junk)
    _invoke(["eval", "--model", "tiny-random-llama", "--k", "1", "--n-test", "2", "--data-dir", tmp_path / "data"])


@SETTINGS
@given(steps=st.integers(-1, 2), dim=st.integers(0, 4), layers=st.integers(0, 2), heads=st.integers(0, 3),
       mlp=st.integers(-1, 4), n_eval=st.integers(0, 4), seeds=st.sampled_from(["1", "1,1", "1,2", "-1", "x", ""]))
def test_synthetic_options_never_crash(tmp_path, steps, dim, layers, heads, mlp, n_eval, seeds):
    out = tmp_path / f"s{steps}{dim}{layers}{heads}{mlp}{n_eval}{seeds}"
    out.mkdir()
    (out / "summary.json").write_text(SENTINEL)
    res = _invoke(["synthetic", "--steps", steps, "--dim", dim, "--layers", layers, "--heads", heads, "--mlp-hidden",
                   mlp, "--n-eval", n_eval, "--n-context", 3, *(["--seeds", seeds] if seeds else []), "--out", out])
    assert res.exit_code == 2 and (out / "summary.json").read_text() == SENTINEL  # refused, not replaced


# required options of each command, on tiny models; every other integer option is then given a negative value
_BASE = {
    "eval": ["--model", "tiny-random-llama", "--n-test", "1", "--k", "1"],
    "compare": ["--model", "tiny-random-llama", "--n-test", "1", "--k", "1"],
    "mechanisms": ["--model", "tiny-random-llama", "--n-test", "1", "--k", "1", "--n-dev", "1", "--n-dummy", "1",
                   "--n-cie", "1", "--n-link", "1"],
    "pretrain": ["--config", "tiny", "--steps", "1"],
    "momentum compare": ["--config", "tiny", "--steps", "1", "--seeds", "1"],
    "momentum apply": ["--model", "tiny-random-llama", "--n-test", "1", "--k", "1"],
    "synthetic": ["--steps", "1", "--n-eval", "4"],
    "reproduce": ["--model", "tiny-random-llama", "--n-test", "1", "--k", "1"],
    "dual verify": ["--model", "tiny-random-llama", "--k", "1"],
    "dual compare-updates": ["--before", "tiny-random-llama", "--after", "tiny-random-llama", "--k", "1"],
    "world train": ["--size", "tiny", "--steps", "1"],
    "world tasks": [],  # its folder is an argument, not --out
}
_FOLDER_ARGUMENT = {"world tasks"}


def test_the_property_test_covers_every_command():
    assert {name for name, _ in _commands()} - {"report"} == set(_BASE)


@pytest.mark.parametrize("command", sorted(_BASE))
@settings(max_examples=4, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_negative_integer_is_refused_before_anything_is_written(tmp_path, command, data):
    cmd = dict(_commands())[command]
    ints = sorted(p.opts[0] for p in cmd.params if p.param_type_name == "option" and _is_int(p))
    option = data.draw(st.sampled_from(ints), label="option")
    value = data.draw(st.integers(-2**40, -1), label="value")
    out = tmp_path / f"{command.replace(' ', '-')}{option}{value}"
    out.mkdir()
    (out / "results.json").write_text(SENTINEL)
    before = _files(out)
    where = [out] if command in _FOLDER_ARGUMENT else ["--out", out]
    args = [*command.split(), *_BASE[command], option, value, *where]
    res = _invoke(args)
    assert res.exit_code == 2 and option in res.output, (args, res.output)
    assert _files(out) == before  # nothing written, nothing replaced


def _is_int(p) -> bool:
    td = getattr(p, "type_descriptor", None)  # typer >= 0.26
    if td is not None:
        return td.annotation is int
    return getattr(getattr(p, "type", None), "name", None) == "integer"
