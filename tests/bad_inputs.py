"""More bad inputs for the robustness table (issue 16): option values, task specs, data files, model
folders, result files, run folders. Each must end in one ``error:`` line and exit status 2, before any
model is loaded or any file is written where that is possible. Used by tests/test_robustness.py.
"""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

_HELD = []  # lock files held open by the table (a concurrent writer), released when the process ends


def _spec(tmp: Path, fname: str, data_dir: Path, **changes) -> str:
    doc = {"name": "mine", "template": "Review: {sentence} Sentiment:", "label_words": ["bad", "good"],
           "fields": {"sentence": "text"}, "demo_file": str(data_dir / "sst2" / "glue_train.jsonl"),
           "eval_file": str(data_dir / "sst2" / "dev.jsonl")}
    doc.update(changes)
    for k in [k for k, v in changes.items() if v is _DROP]:
        doc.pop(k)
    p = tmp / "specs" / f"{fname}.json"
    p.parent.mkdir(exist_ok=True)
    p.write_text(json.dumps(doc, indent=1))
    return str(p)


_DROP = object()


def _same(tmp: Path) -> str:
    """One small data file used as both splits of a spec."""
    p = tmp / "same.jsonl"
    p.write_text('{"text": "fine", "label": 0}\n{"text": "great", "label": 1}\n')
    return str(p)


def _data(tmp: Path, name: str, dev: bytes) -> str:
    d = tmp / "data" / name / "sst2"
    d.mkdir(parents=True)
    (d / "glue_train.jsonl").write_text('{"text": "fine", "label": 0}\n{"text": "great", "label": 1}\n')
    (d / "dev.jsonl").write_bytes(dev)
    return str(d.parent)


def extra_cases(tmp: Path, data_dir: Path, sweep: list[str], rep: Path) -> list[tuple[str, list[str]]]:
    import torch

    from iclgd.core.models import build_tiny

    tiny = ["--model", "tiny-random-llama"]
    small = [*tiny, "--n-test", "2", "--k", "2"]
    cuda = "cuda:99" if torch.cuda.is_available() else "cuda"

    # model folders
    m = tmp / "models"
    for sub in ("empty", "readme", "notype", "badjson", "noweights", "notok", "trunc"):
        (m / sub).mkdir(parents=True)
    (m / "readme" / "README.md").write_text("a model card\n")
    (m / "notype" / "config.json").write_text('{"hidden_size": 16}')
    (m / "badjson" / "config.json").write_text('{"model_type": "llama",')
    lm = build_tiny("tiny-random-llama")
    lm.model.config.save_pretrained(m / "noweights")
    lm.model.save_pretrained(m / "notok")
    lm.model.save_pretrained(m / "trunc")
    (m / "trunc" / "tokenizer.json").write_text(lm.tokenizer.backend_tokenizer.to_str())
    w = (m / "trunc" / "model.safetensors").read_bytes()
    (m / "trunc" / "model.safetensors").write_bytes(w[: len(w) // 3])

    # state dicts
    (tmp / "garbage.pt").write_bytes(b"\x00not a pickle at all" * 10)
    (tmp / "garbage.safetensors").write_bytes(b"\xff" * 64)
    sd = {k: v.clone() for k, v in lm.model.state_dict().items()}
    sd["model.embed_tokens.weight"] = torch.zeros(3, 5)
    torch.save(sd, tmp / "othershape.pt")
    torch.save([1, 2, 3], tmp / "alist.pt")

    # data files
    nonutf = _data(tmp, "nonutf", b'{"text": "ok", "label": 0}\n{"text": "caf\xe9", "label": 1}\n')
    null = _data(tmp, "null", b'{"text": "ok", "label": 0}\n{"text": null, "label": 1}\n')
    number = _data(tmp, "number", b'{"text": 3.5, "label": 0}\n')
    alist = _data(tmp, "alist", b'[1, 2]\n')
    nofield = _data(tmp, "nofield", b'{"sentence": "ok", "label": 0}\n')
    boollab = _data(tmp, "boollab", b'{"text": "ok", "label": true}\n')

    # task specs
    sp = lambda fname, **c: ["eval", *small, "--task-spec", _spec(tmp, fname, data_dir, **c)]  # noqa: E731
    nonutf_spec = tmp / "specs" / "latin1.json"
    nonutf_spec.parent.mkdir(exist_ok=True)
    nonutf_spec.write_bytes(b'{"name": "caf\xe9"}')
    (tmp / "specs" / "list.json").write_text("[1, 2]")

    # result and sweep files of the wrong shape
    wrong = tmp / "wrongsweep"
    (wrong / "units").mkdir(parents=True)
    (wrong / "sweep.json").write_text("[1, 2, 3]")
    nokeys = tmp / "nokeys"
    nokeys.mkdir()
    (nokeys / "sweep.json").write_text('{"kind": "iclgd.reproduce"}')
    import shutil

    listunit = tmp / "listunit"
    shutil.copytree(rep, listunit)
    (listunit / "units" / "compare-sst2-s1" / "result.json").write_text("[]")
    foreign = tmp / "foreign"
    shutil.copytree(rep, foreign)
    from iclgd.experiments.sweep import SweepConfig, plan

    params = {u.id: u.p() for u in plan(SweepConfig(**json.loads((rep / "sweep.json").read_text())["config"]))}
    doc = {"unit": {"id": "compare-sst2-s1", "kind": "compare", "params": params["compare-sst2-s1"]}}
    doc["unit"]["params"]["k"] = 16
    (foreign / "units" / "compare-sst2-s1" / "result.json").write_text(json.dumps(doc))
    otherdata = tmp / "otherdata"
    shutil.copytree(rep, otherdata)
    (otherdata / "units" / "compare-sst2-s1" / "result.json").write_text(
        json.dumps({**doc, "unit": {**doc["unit"], "params": {**doc["unit"]["params"], "k": 2}},
                    "data_sha256": {"/elsewhere/sst2/dev.jsonl": "0" * 64}}))
    copy = tmp / "datacopy"
    shutil.copytree(Path(data_dir) / "sst2", copy / "sst2")

    # run folders: an earlier result, a concurrent writer, a pretraining run of another configuration
    earlier = tmp / "earlier"
    earlier.mkdir()
    (earlier / "results.json").write_text('{"kind": "iclgd.eval"}\n')
    (earlier / "momentum_apply.json").write_text('{"kind": "iclgd.momentum_apply"}\n')
    busy = tmp / "busy"
    busy.mkdir()
    f = open(busy / ".iclgd-writer.lock", "a+")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    f.write("4242")
    f.flush()
    _HELD.append(f)
    pre = tmp / "pre"
    from typer.testing import CliRunner

    from iclgd.cli import app

    from test_runfolder import small_corpus

    corpus = small_corpus(tmp)
    res = CliRunner().invoke(app, ["pretrain", "--config", "tiny", "--steps", "2", "--corpus", corpus, "--out", str(pre)])
    assert res.exit_code == 0, res.output
    ro = tmp / "afile"

    return [
        # option values, checked before any model loads
        ("negative seed", ["eval", *small, "--seed", "-1"]),
        ("seed too large", ["eval", *small, "--seed", str(2**40)]),
        ("batch size 0", ["eval", *small, "--batch-size", "0"]),
        ("negative batch size (wrote NaN accuracies)", ["eval", *small, "--batch-size", "-3"]),
        ("negative k", ["eval", *tiny, "--n-test", "2", "--k", "-1"]),
        ("n-test 0", ["eval", *tiny, "--n-test", "0"]),
        ("max-len 0", ["eval", *small, "--max-len", "0"]),
        ("unknown dtype", ["eval", *small, "--dtype", "float8"]),
        ("unknown device", ["eval", *small, "--device", "tpu"]),
        ("a dtype the family cannot run in (XGLM in float64)",
         ["eval", "--model", "tiny-random-xglm", "--n-test", "2", "--k", "2", "--dtype", "float64"]),
        ("--device cuda without a GPU", ["eval", *small, "--device", cuda]),
        ("compare --k 0", ["compare", *tiny, "--k", "0", "--n-test", "2"]),
        ("duplicate seeds", ["compare", *small, "--seeds", "1,1"]),
        ("seeds not integers", ["compare", *small, "--seeds", "a,b"]),
        ("negative learning rate", ["compare", *small, "--lr", "-0.1"]),
        ("NaN learning rate", ["compare", *small, "--lr", "nan"]),
        ("kendall-n 0", ["compare", *small, "--kendall-n", "0"]),
        ("--bos none where a start token is needed", ["compare", *small, "--bos", "none"]),
        ("output path is a file", ["eval", *small, "--out", str(ro)]),
        ("empty task list", ["eval", *small, "--task", ","]),
        ("missing task spec file", ["eval", *small, "--task-spec", str(tmp / "nope.json")]),
        # usage errors of the option parser, in the same one-line form
        ("unknown option", ["eval", "--frobnicate"]),
        ("integer option given text", ["eval", "--k", "abc"]),
        ("float option given text", ["compare", "--lr", "fast"]),
        ("required option missing", ["pretrain"]),
        ("unknown command", ["evaluate"]),
        ("extra argument", ["report", str(rep), "again"]),
        # pretraining and momentum
        ("pretrain --steps 0", ["pretrain", "--config", "tiny", "--steps", "0", "--out", str(tmp / "p0")]),
        ("pretrain negative seed", ["pretrain", "--seed", "-5", "--out", str(tmp / "p1")]),
        ("pretrain unknown size", ["pretrain", "--config", "huge", "--out", str(tmp / "p2")]),
        ("pretrain unknown attention", ["pretrain", "--attention", "sparse", "--out", str(tmp / "p3")]),
        ("pretrain into a folder of another attention",
         ["pretrain", "--config", "tiny", "--steps", "2", "--corpus", corpus, "--attention", "momentum",
          "--out", str(pre)]),
        ("pretrain into a folder of another corpus",
         ["pretrain", "--config", "tiny", "--steps", "2", "--corpus", "austen", "--out", str(pre)]),
        ("momentum compare duplicate seeds", ["momentum", "compare", "--seeds", "1,1", "--out", str(tmp / "m1")]),
        ("momentum compare duplicate lengths",
         ["momentum", "compare", "--lengths", "128,128", "--out", str(tmp / "m2")]),
        ("momentum compare eta 0", ["momentum", "compare", "--eta", "0", "--out", str(tmp / "m3")]),
        ("momentum apply eta 1", ["momentum", "apply", *tiny, "--eta", "1"]),
        ("momentum apply n-test 0", ["momentum", "apply", *tiny, "--n-test", "0"]),
        # synthetic
        ("synthetic --steps 0", ["synthetic", "--steps", "0"]),
        ("synthetic --layers 0", ["synthetic", "--layers", "0"]),
        ("synthetic duplicate seeds", ["synthetic", "--seeds", "2,2", "--steps", "1"]),
        ("synthetic --lr 0", ["synthetic", "--lr", "0", "--steps", "1"]),
        ("synthetic --n-eval 1", ["synthetic", "--n-eval", "1", "--steps", "1"]),
        ("synthetic --heads 0", ["synthetic", "--heads", "0", "--steps", "1"]),
        # reproduce and report
        ("reproduce duplicate seeds", ["reproduce", *tiny, "--seeds", "3,3", "--out", str(tmp / "r1")]),
        ("reproduce --k 0", ["reproduce", *tiny, "--k", "0", "--out", str(tmp / "r2")]),
        ("unknown device map", ["reproduce", *tiny, "--device-map", "balanced", "--out", str(tmp / "r3")]),
        ("unknown preset", ["reproduce", *tiny, "--preset", "full", "--out", str(tmp / "r4")]),
        ("sweep folder of another data directory", [*sweep[:-2], "--data-dir", str(copy), "--out", str(rep)]),
        ("report on a folder without sweep.json", ["report", str(tmp / "earlier")]),
        ("sweep.json of the wrong shape", ["report", str(wrong)]),
        ("sweep.json without its keys", ["report", str(nokeys)]),
        ("unit result of the wrong shape", ["report", str(listunit)]),
        ("unit of another configuration in the folder", ["report", str(foreign)]),
        ("unit computed from other data", ["report", str(otherdata)]),
        # run folders
        ("eval --out over an earlier results file", ["eval", *small, "--out", str(earlier)]),
        ("eval --format xml", ["eval", *small, "--format", "xml"]),
        ("a second writer on the same folder", ["eval", *small, "--out", str(busy)]),
        ("momentum apply --out over an earlier result", ["momentum", "apply", *tiny, "--n-test", "1", "--out",
                                                           str(earlier)]),
        # dual
        ("dual verify --k 0", ["dual", "verify", *tiny, "--k", "0"]),
        ("dual verify unsupported dtype", ["dual", "verify", *tiny, "--dtype", "bfloat16"]),
        ("state dict that is garbage", ["dual", "compare-updates", "--before", "tiny-random-llama", "--after",
                                        str(tmp / "garbage.pt")]),
        ("safetensors file that is garbage", ["dual", "compare-updates", "--before", "tiny-random-llama", "--after",
                                              str(tmp / "garbage.safetensors")]),
        ("state dict of another shape", ["dual", "compare-updates", "--before", "tiny-random-llama", "--after",
                                         str(tmp / "othershape.pt")]),
        ("a .pt file that is not a state dict", ["dual", "compare-updates", "--before", "tiny-random-llama",
                                                 "--after", str(tmp / "alist.pt")]),
        # task specs as data
        ("task spec not UTF-8", ["eval", *small, "--task-spec", str(nonutf_spec)]),
        ("task spec a JSON list", ["eval", *small, "--task-spec", str(tmp / "specs" / "list.json")]),
        ("template not a format string", sp("unclosed", template="Review: {sentence Sentiment:")),
        ("template without a placeholder", sp("noph", template="Review: Sentiment:", fields=_DROP)),
        ("positional placeholder", sp("positional", template="Review: {0} Sentiment:", fields=_DROP)),
        ("duplicate label words", sp("dup", label_words=["good", "bad", "good"])),
        ("demonstration file is the evaluation file", sp("demoiseval", demo_file=_same(tmp), eval_file=_same(tmp))),
        ("label_words a string", sp("str", label_words="good,bad")),
        ("one label word", sp("one", label_words=["good"])),
        ("name not a string", sp("num", name=7)),
        ("unknown spec field (typo)", sp("typo", labels=["bad", "good"])),
        ("answer format without {label}", sp("answer", answer_format=" answer")),
        ("fields not matching the template", sp("fields", fields={"review": "text"})),
        ("eval_cap not a positive integer", sp("cap", eval_cap=-3)),
        # data files as data
        ("data file not UTF-8", ["eval", *small, "--data-dir", nonutf]),
        ("null text field", ["eval", *small, "--data-dir", null]),
        ("number as text", ["eval", *small, "--data-dir", number]),
        ("data line a JSON list", ["eval", *small, "--data-dir", alist]),
        ("data line without the text field", ["eval", *small, "--data-dir", nofield]),
        ("boolean label", ["eval", *small, "--data-dir", boollab]),
        # model folders
        ("empty model folder", ["eval", "--model", str(m / "empty"), "--n-test", "2"]),
        ("model folder without config.json", ["eval", "--model", str(m / "readme"), "--n-test", "2"]),
        ("config without model_type", ["eval", "--model", str(m / "notype"), "--n-test", "2"]),
        ("config.json not valid JSON", ["eval", "--model", str(m / "badjson"), "--n-test", "2"]),
        ("model folder without weights", ["eval", "--model", str(m / "noweights"), "--n-test", "2"]),
        ("model folder without tokenizer", ["eval", "--model", str(m / "notok"), "--n-test", "2"]),
        ("truncated safetensors", ["eval", "--model", str(m / "trunc"), "--n-test", "2", "--k", "2"]),
    ]
