"""Bad inputs: each gets one line naming what is wrong and exit status 2, and leaves no half-written file.

Running this test regenerates docs/robustness.md, the table of those messages.
"""

import json
from pathlib import Path

from typer.testing import CliRunner

from iclgd.cli import app

from bad_inputs import extra_cases
from bad_inputs_more import more_cases

DOC = Path(__file__).resolve().parents[1] / "docs" / "robustness.md"


def _cases(tmp: Path, data_dir: Path) -> list[tuple[str, list[str]]]:
    bad = tmp / "bad"
    (bad / "sst2").mkdir(parents=True)
    (bad / "sst2" / "glue_train.jsonl").write_text('{"text": "fine", "label": 0}\n' * 3)
    (bad / "sst2" / "dev.jsonl").write_text('{"text": "ok", "label": 0}\n{"text": "broken", "label": \n')
    lab = tmp / "lab"
    (lab / "sst2").mkdir(parents=True)
    (lab / "sst2" / "glue_train.jsonl").write_text('{"text": "fine", "label": 0}\n')
    (lab / "sst2" / "dev.jsonl").write_text('{"text": "ok", "label": 7}\n')
    empty = tmp / "empty"
    empty.mkdir()
    (tmp / "afile").write_text("x")
    import transformers as T

    # Persimmon's fused query_key_value: its row order is not derived (BLOOM's and Falcon's now are)
    T.PersimmonConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                      vocab_size=50).save_pretrained(tmp / "bloom")
    mom = tmp / "mom"  # a momentum compare folder whose results.json is of seeds [1]
    mom.mkdir()
    (mom / "results.json").write_text(json.dumps({"config": {"corpus": "tinyshakespeare", "seeds": [1], "eta": 0.9,
                                                            "learnable_eta": False, "size": "tiny", "steps": 1,
                                                            "lengths": [128, 256, 512]}}))
    blank = tmp / "blank.txt"
    blank.write_text("\n\n")
    rep = tmp / "rep"
    sweep = ["reproduce", "--model", "tiny-random-gpt2", "--tasks", "sst2", "--n-test", "2", "--k", "2",
             "--no-untrained", "--no-dual", "--no-synthetic", "--out", str(rep)]
    assert CliRunner().invoke(app, sweep).exit_code == 0
    (rep / "units" / "compare-sst2-s1" / "result.json").write_text('{"unit": {"id": "compare-sst2-s1", ')
    tiny = ["--model", "tiny-random-gpt2"]
    return [
        ("unknown task", ["eval", "--task", "imdb"]),
        ("unknown model", ["eval", "--model", "gpt-17"]),
        ("unsupported attention layout", ["compare", "--model", str(tmp / "bloom"), "--n-test", "2"]),
        ("missing data directory", ["eval", *tiny, "--data-dir", str(tmp / "nowhere")]),
        ("missing data file", ["eval", *tiny, "--data-dir", str(empty)]),
        ("malformed JSON line", ["eval", *tiny, "--data-dir", str(bad)]),
        ("label outside the verbalizer", ["eval", *tiny, "--data-dir", str(lab)]),
        ("k larger than the train split", ["eval", *tiny, "--k", "100000"]),
        ("prompt too long for the context", ["eval", *tiny, "--max-len", "20", "--n-test", "2"]),
        ("unwritable output directory", ["eval", *tiny, "--n-test", "2", "--out", str(tmp / "afile" / "out")]),
        ("NaN loss during finetuning", ["compare", *tiny, "--k", "3", "--n-test", "2", "--lr", "1e30",
                                        "--out", str(tmp / "nan")]),
        ("corrupted result file on resume", sweep),
        ("bad prediction position", ["compare", *tiny, "--position", "middle"]),
        ("momentum eta outside (0, 1)", ["pretrain", "--attention", "momentum", "--eta", "1.5", "--config", "tiny",
                                         "--out", str(tmp / "eta")]),
        ("unknown corpus", ["pretrain", "--corpus", "wikitext-103", "--out", str(tmp / "corp")]),
        ("empty corpus", ["pretrain", "--corpus", str(blank), "--out", str(tmp / "corp2")]),
        ("sweep folder of another configuration", [*sweep[:-2], "--seeds", "2", "--out", str(rep)]),
        ("bad shard", ["reproduce", "--shard", "3/2", "--out", str(tmp / "shard")]),
        ("hub model not available offline", ["reproduce", "--model", "nobody/no-such-model", "--eval-only",
                                             "--tasks", "sst2", "--out", str(tmp / "nohub")]),
        ("bad batch size", ["eval", *tiny, "--batch-size", "many"]),
        ("momentum results of another configuration", ["momentum", "compare", "--config", "tiny", "--steps", "1",
                                                       "--seeds", "2", "--out", str(mom)]),
        ("unknown synthetic attention", ["synthetic", "--attention", "cosine", "--steps", "1"]),
    ] + extra_cases(tmp, data_dir, sweep, rep) + more_cases(tmp, data_dir)


def test_bad_inputs_one_line_exit_2_nothing_half_written(tmp_path, data_dir):
    (tmp_path / "afile").parent.mkdir(exist_ok=True)
    rows = []
    cases = _cases(tmp_path, data_dir)
    assert len({w for w, _ in cases}) == len(cases), "each row a distinct bad input"
    for what, args in cases:
        res = CliRunner().invoke(app, args)
        lines = [x for x in res.output.splitlines() if x.strip() and not x.startswith(("\\r", "\r"))]
        errors = [x for x in lines if x.startswith("error: ")]
        assert res.exit_code == 2, (what, res.output)
        assert len(errors) == 1 and "Traceback" not in res.output, (what, res.output)
        shown = lambda t: t.replace(str(tmp_path), "<tmp>").replace(str(data_dir), "<data>")  # noqa: E731
        rows.append((what, shown(" ".join(args)), shown(errors[0])))
    assert len(rows) >= 200
    # nothing half-written: no temporary files, and no results file from a failed run
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    assert not (tmp_path / "nohub").exists()  # refused before the sweep folder is written
    for d in ("nan", "eta"):
        assert not list((tmp_path / d).glob("results.json")) if (tmp_path / d).exists() else True
    text = ["# Bad input and the one line each gets", "",
            "Generated by `tests/test_robustness.py` (every run of the suite rewrites it). Each command exits with "
            "status 2 and leaves no half-written file.", "", "| bad input | command | message |", "|---|---|---|"]
    text += [f"| {w} | `{c}` | `{m}` |" for w, c, m in rows]
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text("\n".join(text) + "\n")
