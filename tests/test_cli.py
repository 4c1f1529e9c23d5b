import json

import pytest
from typer.testing import CliRunner

from iclgd.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(args))


def test_eval_writes_results(tmp_path):
    res = run("eval", "--model", "tiny-random-llama", "--task", "sst2,cb", "--k", "2", "--n-test", "4",
              "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    assert "acc_icl" in res.output
    d = json.loads((tmp_path / "results.json").read_text())
    assert [r["task"] for r in d["results"]] == ["sst2", "cb"]
    assert all(len(h) == 64 for h in d["data_sha256"].values()) and len(d["data_sha256"]) == 4
    assert d["versions"]["torch"] and d["config"]["k"] == 2 and d["config"]["seeds"] == [1] and "seed" not in d["config"]
    assert len(d["results"][0]["records"]) == 4
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("args,message", [
    (["--task", "imdb"], "unknown task"),
    (["--model", "nope"], "unknown model"),
    (["--model", "tiny-random-gpt2", "--k", "999999"], "larger than the demonstration split"),
    (["--data-dir", "/nonexistent/dir"], "directory not found"),
    (["--model", "tiny-random-gpt2", "--n-test", "0"], "--n-test 0"),
])
def test_bad_input_one_line_exit_2(args, message):
    res = run("eval", *args)
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in res.output


def test_malformed_data_via_cli(tmp_path):
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "dev.jsonl").write_text('{"text": "ok", "label": 0}\nnot json\n')
    (tmp_path / "sst2" / "glue_train.jsonl").write_text('{"text": "ok", "label": 0}\n')
    res = run("eval", "--model", "tiny-random-gpt2", "--data-dir", str(tmp_path))
    assert res.exit_code == 2
    assert "dev.jsonl:2: malformed JSON line" in res.output


def test_version_prints_the_package_version():
    from importlib.metadata import version

    res = run("--version")
    assert res.exit_code == 0 and res.output.strip() == f"iclgd {version('iclgd')}"


def test_renamed_options_keep_their_old_names_hidden(tmp_path, data_dir):
    """CHANGELOG 0.2: --seed -> --seeds, --config -> --size, --layers -> --n-layers; the old names still work,
    do not show in --help, and giving old and new at once is refused in one line."""
    from typer.testing import CliRunner

    from iclgd.cli import app

    run = CliRunner().invoke
    r = run(app, ["eval", "--model", "tiny-random-gpt2", "--seed", "3", "--k", "1", "--n-test", "2",
                  "--data-dir", str(data_dir), "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "e" / "results.json").read_text())
    assert doc["config"]["seeds"] == [3] and doc["results"][0]["seed"] == 3
    for args, old in ((["synthetic", "--seed", "1", "--seeds", "2"], "--seed"),
                      (["pretrain", "--config", "tiny", "--size", "tiny", "--out", str(tmp_path / "p")], "--config"),
                      (["synthetic", "--layers", "2", "--n-layers", "3"], "--layers")):
        r = run(app, args)
        assert r.exit_code == 2 and f"{old} is the old name" in r.output, r.output
    assert not (tmp_path / "p").exists()
    help_text = run(app, ["eval", "--help"], env={"COLUMNS": "200"}).output
    assert "--seeds" in help_text and "--seed " not in help_text and "[default: auto]" in help_text
