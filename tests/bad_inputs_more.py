"""Still more bad inputs for the robustness table: task-spec fields of the wrong type or value, templates that
parse but fail when rendered, data rows of the wrong shape, options given twice or in conflict, run folders
holding another run or hand-edited files, and model folders that do not fit together. Each must end in one
``error:`` line and exit status 2. Used by tests/test_robustness.py (which builds ``tmp/rep`` first).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bad_inputs import _DROP, _data, _spec


def _write(p: Path, content: str | bytes) -> str:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(p)


def _ok(args: list[str]) -> None:
    """A cheap real run the table's cases then find in their folder."""
    from typer.testing import CliRunner

    from iclgd.cli import app

    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, (args, res.output)


def more_cases(tmp: Path, data_dir: Path) -> list[tuple[str, list[str]]]:
    m = tmp / "more"
    m.mkdir()
    tiny = ["--model", "tiny-random-llama"]
    small = [*tiny, "--n-test", "2", "--k", "2"]
    train = str(data_dir / "sst2" / "glue_train.jsonl")
    dev = str(data_dir / "sst2" / "dev.jsonl")
    base = {"name": "mine", "template": "Review: {sentence} Sentiment:", "label_words": ["bad", "good"],
            "fields": {"sentence": "text"}, "demo_file": train, "eval_file": dev}

    def sp(fname: str, cmd: str = "eval", **c) -> list[str]:
        return [cmd, *small, "--task-spec", _spec(m, fname, data_dir, **c)]

    def raw(fname: str, content: str | bytes, cmd: str = "eval") -> list[str]:
        return [cmd, *small, "--task-spec", _write(m / "raw" / fname, content)]

    def body(**c) -> str:  # the base spec as JSON text, with changes (for hand-written variants)
        return json.dumps({**base, **c}, indent=1)

    def rows(fname: str, content: str | bytes, **c) -> list[str]:
        """A spec whose evaluation file holds ``content`` (demonstrations from the real sst2 file)."""
        return sp(f"rows-{fname}", eval_file=_write(m / "rows" / f"{fname}.jsonl", content), **c)

    def demo_rows(fname: str, content: str | bytes) -> list[str]:
        return sp(f"demo-{fname}", demo_file=_write(m / "demo" / f"{fname}.jsonl", content))

    ok_row = '{"text": "fine", "label": 0}\n'

    # ----------------------------------------------------------------- task specs
    specs = [
        # templates whose placeholder names are valid but that fail when rendered
        ("template with a format spec {sentence:d}", sp("fmt-d", template="Review: {sentence:d} Sentiment:")),
        ("template with a nested format spec", sp("fmt-nested", template="Review: {sentence:>{w}} Sentiment:")),
        ("template with an unknown conversion !x", sp("conv-x", template="Review: {sentence!x} Sentiment:")),
        ("template with a conversion and a bad spec", sp("conv-rq", template="Review: {sentence!r:q} Sentiment:")),
        ("template placeholder with an attribute", sp("attr", template="Review: {sentence.upper} Sentiment:")),
        ("template placeholder with an index", sp("index", template="Review: {sentence[0]} Sentiment:")),
        ("template with a lone closing brace", sp("close", template="Review: {sentence} Sentiment: }")),
        ("answer format with a format spec {label:d}", sp("ans-d", answer_format=" {label:d}")),
        ("answer format with an unknown conversion", sp("ans-x", answer_format=" {label!x}")),
        ("answer format with a nested format spec", sp("ans-nested", answer_format=" {label:>{w}}")),
        ("answer format with two placeholders", sp("ans-two", answer_format=" {label} {label}")),
        ("answer format of another name", sp("ans-name", answer_format=" {answer}")),
        ("answer format not a format string", sp("ans-open", answer_format=" {label")),
        # duplicate keys
        ("duplicate key in a task spec",
         raw("dup-top.json", body()[:-1] + ',\n "name": "again"\n}')),
        ("duplicate key inside hub",
         raw("dup-hub.json", body()[:-1] + ',\n "hub": {"path": "glue", "path": "sst2", "demo_split": "train", '
                                           '"eval_split": "validation", "columns": {}}\n}')),
        ("duplicate key inside fields",
         raw("dup-fields.json", body(fields="@@")[:-1].replace('"@@"', '{"sentence": "text", "sentence": "x"}')
             + "}")),
        # lr
        ("lr NaN in a task spec", sp("lr-nan", "compare", lr=float("nan"))),
        ("lr Infinity in a task spec", sp("lr-inf", "compare", lr=float("inf"))),
        ("lr -Infinity in a task spec", sp("lr-minf", "compare", lr=float("-inf"))),
        ("lr 0 in a task spec", sp("lr-0", "compare", lr=0)),
        ("lr negative in a task spec", sp("lr-neg", "compare", lr=-1)),
        ("lr a string in a task spec", sp("lr-str", "compare", lr="1e-3")),
        ("lr a boolean in a task spec", sp("lr-bool", "compare", lr=True)),
        # eval_cap and eval_shuffle_seed
        ("eval_cap 0", sp("cap-0", eval_cap=0)),
        ("eval_cap a fraction", sp("cap-frac", eval_cap=1.5)),
        ("eval_cap a boolean", sp("cap-bool", eval_cap=True)),
        ("eval_shuffle_seed negative", sp("shuf-neg", eval_shuffle_seed=-1)),
        ("eval_shuffle_seed a string", sp("shuf-str", eval_shuffle_seed="1")),
        # fields of the wrong type
        ("fields a list", sp("fields-list", fields=["sentence"])),
        ("fields a string", sp("fields-str", fields="sentence")),
        ("fields mapping to a number", sp("fields-num", fields={"sentence": 3})),
        ("deviations a string", sp("dev-str", deviations="fewer examples")),
        ("deviations a list of numbers", sp("dev-num", deviations=[1, 2])),
        ("notes a string", sp("notes-str", notes="a note")),
        ("hub a string", sp("hub-str", hub="glue/sst2")),
        ("hub without its splits", sp("hub-missing", hub={"path": "glue", "columns": {}})),
        ("hub with an unknown key", sp("hub-extra", hub={"path": "glue", "name": "sst2", "demo_split": "train",
                                                         "eval_split": "validation", "columns": {}, "revision": "x"})),
        ("hub path empty", sp("hub-empty", hub={"path": "", "demo_split": "train", "eval_split": "validation",
                                                "columns": {}})),
        ("demo_fallback a number", sp("fallback-num", demo_fallback=3)),
        ("demo_overlap not remove or keep", sp("overlap", demo_overlap="maybe")),
        # empty or blank strings
        ("name an empty string", sp("name-empty", name="")),
        ("name only white space", sp("name-blank", name="   ")),
        ("template an empty string", sp("tmpl-empty", template="")),
        ("template only white space", sp("tmpl-blank", template=" \n\t")),
        ("label word an empty string", sp("lw-empty", label_words=["bad", ""])),
        ("label word only white space", sp("lw-blank", label_words=["bad", "  "])),
        ("answer format an empty string", sp("ans-empty", answer_format="")),
        ("demo_file an empty string", sp("demofile-empty", demo_file="")),
        # label words of the wrong type
        ("label_words a nested list", sp("lw-nested", label_words=[["bad"], ["good"]])),
        ("label_words numbers", sp("lw-num", label_words=[0, 1])),
        ("label_words an empty list", sp("lw-none", label_words=[])),
        ("label_words null", sp("lw-null", label_words=None)),
        # the file itself
        ("task spec a JSON string", raw("string.json", '"sst2"')),
        ("task spec null", raw("null.json", "null")),
        ("task spec a number", raw("number.json", "42")),
        ("task spec an empty file", raw("empty.json", "")),
        ("task spec only white space", raw("blank.json", " \n\n")),
        ("task spec in UTF-16", raw("utf16.json", body().encode("utf-16"))),
        ("task spec with a UTF-8 BOM", raw("bom.json", b"\xef\xbb\xbf" + body().encode())),
        ("truncated task spec", raw("trunc.json", body()[: len(body()) // 2])),
        ("task spec with a trailing comma", raw("comma.json", body()[:-2] + ",\n}")),
        ("task spec with a comment", raw("comment.json", "// my task\n" + body())),
        ("task spec with two objects", raw("two.json", body() + "\n" + body())),
        ("unknown spec field beside valid ones", sp("unknown", verbalizer={"0": "bad"})),
        # required fields, each one
        ("task spec without name", sp("no-name", name=_DROP)),
        ("task spec without template", sp("no-template", template=_DROP)),
        ("task spec without label_words", sp("no-lw", label_words=_DROP)),
        ("task spec without demo_file", sp("no-demo", demo_file=_DROP)),
        ("task spec without eval_file", sp("no-eval", eval_file=_DROP)),
        ("task spec of only an unknown field", raw("only-unknown.json", '{"title": "mine"}')),
        # with other commands
        ("compare task spec with a bad template", sp("cmp-fmt", "compare", template="Review: {sentence:d}")),
        ("dual verify task spec with a duplicate key",
         ["dual", "verify", *tiny, "--k", "2", "--task-spec",
          _write(m / "raw" / "dv-dup.json", body()[:-1] + ',\n "lr": 0.1,\n "lr": 0.2\n}')]),
    ]

    # ----------------------------------------------------------------- data files
    data = [
        ("data line a JSON number", rows("number", ok_row + "3\n")),
        ("data line a JSON string", rows("string", ok_row + '"a review"\n')),
        ("data line JSON null", rows("null", ok_row + "null\n")),
        ("label a string", rows("lab-str", '{"text": "ok", "label": "1"}\n')),
        ("label a float", rows("lab-float", '{"text": "ok", "label": 1.0}\n')),
        ("label negative", rows("lab-neg", '{"text": "ok", "label": -1}\n')),
        ("label null", rows("lab-null", '{"text": "ok", "label": null}\n')),
        ("label missing", rows("lab-missing", '{"text": "ok"}\n')),
        ("label a list", rows("lab-list", '{"text": "ok", "label": [1]}\n')),
        ("text a list", rows("text-list", '{"text": ["ok"], "label": 0}\n')),
        ("text an object", rows("text-obj", '{"text": {"en": "ok"}, "label": 0}\n')),
        ("text a boolean", rows("text-bool", '{"text": true, "label": 0}\n')),
        ("text with a lone surrogate", rows("surrogate", ok_row + '{"text": "bad \\ud800 char", "label": 1}\n')),
        ("empty evaluation file", rows("empty", "")),
        ("evaluation file of blank lines only", rows("blanks", "\n\n  \n")),
        ("evaluation file not UTF-8 (Latin-1)", rows("latin1", b'{"text": "na\xefve", "label": 0}\n')),
        ("evaluation file in UTF-16", rows("utf16", ok_row.encode("utf-16"))),
        ("data line with a trailing comma", rows("comma", '{"text": "ok", "label": 0,}\n')),
        ("two JSON objects on one line", rows("twoobj", ok_row.strip() + ok_row)),
        ("data line NaN as label", rows("lab-nan", '{"text": "ok", "label": NaN}\n')),
        ("empty demonstration file", demo_rows("empty", "")),
        ("demonstration file not UTF-8", demo_rows("latin1", b'{"text": "caf\xe9", "label": 0}\n')),
        ("demonstration row with a bad label", demo_rows("badlab", '{"text": "ok", "label": 5}\n')),
        ("missing demonstration file", sp("demo-missing", demo_file=str(m / "nowhere.jsonl"))),
        ("empty demonstration file in --data-dir",
         ["eval", *small, "--data-dir", _data_demo(m, "emptydemo", b"")]),
        ("text with a lone surrogate in --data-dir",
         ["eval", *small, "--data-dir", _data(m, "surrogate", b'{"text": "x\\udfff", "label": 0}\n')]),
        ("string label in --data-dir", ["eval", *small, "--data-dir", _data(m, "strlab", b'{"text": "x", "label": "0"}\n')]),
    ]

    # ----------------------------------------------------------------- options
    opts = [
        ("--k given twice", ["eval", *tiny, "--n-test", "2", "--k", "2", "--k", "3"]),
        ("--dual and --no-dual together", ["reproduce", *tiny, "--dual", "--no-dual", "--out", str(m / "r-dual")]),
        ("--seed twice, once with =", ["pretrain", "--config", "tiny", "--seed", "1", "--seed=2",
                                       "--out", str(m / "p-seed")]),
        ("--model twice", ["eval", "--model", "tiny-random-llama", "--model", "tiny-random-gpt2", "--n-test", "2"]),
        ("--task and --tasks both given", ["eval", *small, "--task", "sst2", "--tasks", "cb"]),
        ("--preset demo with --n-test", ["reproduce", "--preset", "demo", "--n-test", "50", "--out", str(m / "r-p1")]),
        ("--preset world with --model", ["reproduce", "--preset", "world", *tiny, "--out", str(m / "r-p3")]),
        ("--preset demo with --tasks", ["reproduce", "--preset", "demo", "--tasks", "sst2", "--out", str(m / "r-p2")]),
        ("pretrain --eta with vanilla attention", ["pretrain", "--config", "tiny", "--eta", "0.5",
                                                   "--out", str(m / "p-eta")]),
        ("pretrain --learnable-eta with vanilla attention", ["pretrain", "--config", "tiny", "--learnable-eta",
                                                             "--out", str(m / "p-leta")]),
        ("pretrain --attention ema --eta", ["pretrain", "--config", "tiny", "--attention", "ema", "--eta", "0.5",
                                            "--out", str(m / "p-ema")]),
        ("pretrain --gate with vanilla attention", ["pretrain", "--config", "tiny", "--gate",
                                                    "--out", str(m / "p-gate")]),
        ("world train --gate with vanilla attention", ["world", "train", "--size", "tiny", "--gate",
                                                       "--out", str(m / "w-gate")]),
        ("world train --eta with vanilla attention", ["world", "train", "--size", "tiny", "--eta", "0.5",
                                                      "--out", str(m / "w-eta")]),
        ("--lr inf", ["compare", *small, "--lr", "inf"]),
        ("--n-test a fraction", ["eval", *tiny, "--n-test", "1.5"]),
        ("--seeds with an empty item", ["compare", *small, "--seeds", "1,,x"]),
        ("--seeds empty", ["compare", *small, "--seeds", ""]),
        ("--seeds a range", ["eval", *small, "--seeds", "1-3"]),
        ("--seed and --seeds together", ["eval", *small, "--seed", "3", "--seeds", "4"]),
        ("unknown option of synthetic", ["synthetic", "--steps", "1", "--dims", "3"]),
        ("unknown option of world train", ["world", "train", "--size", "tiny", "--lr", "0.1", "--out", str(m / "w-lr")]),
        ("option of another command (pretrain --k)", ["pretrain", "--k", "3", "--out", str(m / "p-k")]),
        ("single-dash option", ["eval", *small, "-k", "3"]),
        ("synthetic --out an existing file", ["synthetic", "--steps", "1", "--layers", "1", "--out",
                                               _write(m / "afile", "x")]),
        ("pretrain --out an existing file", ["pretrain", "--config", "tiny", "--out", str(m / "afile")]),
        ("world train --out an existing file", ["world", "train", "--size", "tiny", "--out", str(m / "afile")]),
        ("dual verify --out an existing file", ["dual", "verify", *tiny, "--k", "2", "--out", str(m / "afile")]),
        ("reproduce --out an existing file", ["reproduce", *tiny, "--out", str(m / "afile")]),
        ("--updates-n negative", ["compare", *small, "--updates-n", "-1"]),
        ("--untrained-seed negative", ["compare", *small, "--untrained-seed", "-1"]),
        ("unknown --ft-params", ["compare", *small, "--ft-params", "qkv"]),
        ("unknown --ft-mode", ["compare", *small, "--ft-mode", "adam"]),
        ("unknown --ft-loss", ["compare", *small, "--ft-loss", "none"]),
        ("unknown --simam-segment", ["compare", *small, "--simam-segment", "all"]),
        ("unknown --kendall-scale", ["compare", *small, "--kendall-scale", "sqrt"]),
        ("unknown --untrained-reinit", ["compare", *small, "--untrained-reinit", "mlp"]),
        ("--batch-size a fraction", ["eval", *small, "--batch-size", "1.5"]),
        ("--batch-size empty", ["eval", *small, "--batch-size", ""]),
        ("--dtype empty", ["eval", *small, "--dtype", ""]),
        ("--device cuda:x", ["eval", *small, "--device", "cuda:x"]),
        ("--device cpu:0", ["eval", *small, "--device", "cpu:0"]),
        ("--bos not a token of the vocabulary", ["eval", *small, "--bos", "<no-such-token>"]),
        ("--bos empty", ["eval", *small, "--bos", ""]),
        ("one unknown task in a list", ["eval", *small, "--tasks", "sst2,imdb"]),
        ("dual verify two seeds", ["dual", "verify", *tiny, "--k", "2", "--seeds", "1,2"]),
        ("dual verify layer out of range", ["dual", "verify", *tiny, "--k", "2", "--layers", "0,99"]),
        ("dual verify layers not numbers", ["dual", "verify", *tiny, "--k", "2", "--layers", "first"]),
        ("dual verify negative layer", ["dual", "verify", *tiny, "--k", "2", "--layers", "-1"]),
        ("dual compare-updates two seeds", ["dual", "compare-updates", "--before", "tiny-random-llama", "--after",
                                            "tiny-random-llama", "--seeds", "1,2"]),
        ("--shard not i/n", ["reproduce", *tiny, "--shard", "first", "--out", str(m / "r-sh1")]),
        ("--shard of zero processes", ["reproduce", *tiny, "--shard", "0/0", "--out", str(m / "r-sh2")]),
        ("--shard negative", ["reproduce", *tiny, "--shard", "-1/2", "--out", str(m / "r-sh3")]),
        ("--device-map auto without a GPU", ["reproduce", *tiny, "--device-map", "auto", "--out", str(m / "r-dm")]),
        ("reproduce --n-test 0", ["reproduce", *tiny, "--n-test", "0", "--out", str(m / "r-n0")]),
        ("momentum compare unknown variant", ["momentum", "compare", "--variants", "vanilla,sparse",
                                              "--out", str(m / "mc-v1")]),
        ("momentum compare variants without vanilla first", ["momentum", "compare", "--variants", "momentum,vanilla",
                                                            "--out", str(m / "mc-v2")]),
        ("momentum compare length 0", ["momentum", "compare", "--lengths", "0", "--out", str(m / "mc-l0")]),
        ("momentum compare length beyond the context", ["momentum", "compare", "--size", "tiny", "--steps", "1",
                                                        "--seeds", "1", "--lengths", "1000", "--out", str(m / "mc-l2")]),
        ("momentum compare lengths not numbers", ["momentum", "compare", "--lengths", "long",
                                                  "--out", str(m / "mc-l1")]),
        ("momentum apply negative k", ["momentum", "apply", *tiny, "--k", "-1"]),
        ("synthetic --dim 0", ["synthetic", "--dim", "0", "--steps", "1"]),
        ("synthetic --n-context 0", ["synthetic", "--n-context", "0", "--steps", "1"]),
        ("synthetic negative --mlp-hidden", ["synthetic", "--mlp-hidden", "-1", "--steps", "1"]),
        ("world train --steps 0", ["world", "train", "--size", "tiny", "--steps", "0", "--out", str(m / "w-s0")]),
        ("world train --ckpt-every 0", ["world", "train", "--size", "tiny", "--ckpt-every", "0",
                                        "--out", str(m / "w-c0")]),
        ("world train --threads 0", ["world", "train", "--size", "tiny", "--threads", "0", "--out", str(m / "w-t0")]),
        ("world train negative --world-seed", ["world", "train", "--size", "tiny", "--world-seed", "-1",
                                               "--out", str(m / "w-ws")]),
        ("world train unknown size", ["world", "train", "--size", "huge", "--out", str(m / "w-huge")]),
        ("world tasks folder given twice", ["world", "tasks", str(m / "wt"), "--out", str(m / "wt")]),
        ("world tasks without a folder", ["world", "tasks"]),
        ("world tasks negative --world-seed", ["world", "tasks", "--world-seed", "-1", "--out", str(m / "wt2")]),
    ]

    # ----------------------------------------------------------------- run folders
    syn = m / "syn"  # a finished synthetic run
    syn_args = ["synthetic", "--steps", "1", "--layers", "1", "--n-eval", "64", "--out"]
    _ok([*syn_args, str(syn)])
    ev = m / "ev"  # a finished eval run
    eval_args = ["eval", *small, "--out", str(ev)]
    _ok(eval_args)
    dv = m / "dv"
    dv_args = ["dual", "verify", *tiny, "--k", "2", "--out", str(dv)]
    _ok(dv_args)
    user = m / "user"  # a folder of the user's own files
    _write(user / "notes.txt", "my notes\n")
    man = {}
    for name, text in (("cmdnum", None), ("foreignstr", None), ("noconfig", None)):
        d = m / f"man-{name}"
        shutil.copytree(syn, d)
        doc = json.loads((syn / "iclgd-run.json").read_text())
        if name == "cmdnum":
            text = json.dumps({**doc, "command": 3})
        elif name == "foreignstr":
            text = json.dumps({**doc, "foreign": "notes.txt"})
        elif name == "noconfig":
            text = json.dumps({k: v for k, v in doc.items() if k != "config"})
        (d / "iclgd-run.json").write_text(text)
        man[name] = d
    
    runs = [
        ("eval into a folder of a synthetic run", ["eval", *small, "--out", str(syn)]),
        ("synthetic into a folder of an eval run", [*syn_args, str(ev)]),
        ("dual verify into a folder of a synthetic run", ["dual", "verify", *tiny, "--k", "2", "--out", str(syn)]),
        ("synthetic into a folder of user files", [*syn_args, str(user)]),
        ("dual verify into a folder of user files", ["dual", "verify", *tiny, "--k", "2", "--out", str(user)]),
        ("pretrain into a folder of user files", ["pretrain", "--config", "tiny", "--steps", "1", "--out", str(user)]),
        ("world train into a folder of user files", ["world", "train", "--size", "tiny", "--steps", "1",
                                                     "--out", str(user)]),
        ("run manifest command a number", [*syn_args, str(man["cmdnum"])]),
        ("run manifest foreign a string", [*syn_args, str(man["foreignstr"])]),
        ("run manifest without config", [*syn_args, str(man["noconfig"])]),
        ("synthetic again, same configuration", [*syn_args, str(syn)]),
        ("eval again, same configuration", eval_args),
        ("dual verify again, same configuration", dv_args),
        ("synthetic into its folder, other configuration", [*syn_args[:-1], "--heads", "2", "--out", str(syn)]),
    ]

    # a real world run, then copies with hand-edited configuration files
    world = m / "world"
    world_args = ["world", "train", "--size", "tiny", "--steps", "1", "--out"]
    _ok([*world_args, str(world)])
    cfg_text = (world / "train_config.json").read_text()
    cfg = json.loads(cfg_text)
    wjson = json.loads((world / "world.json").read_text())
    edits = {
        "train_config.json": {
            "notjson": cfg_text[: len(cfg_text) // 2],
            "list": "[]",
            "type": json.dumps({**cfg, "steps": "1"}),
            "unknown": json.dumps({**cfg, "optimizer": "sgd"}),
            "dup": cfg_text[:-2] + ',\n "seed": 1\n}',
            "nan": json.dumps({**cfg, "lr": float("nan")}),
            "other seed": json.dumps({**cfg, "seed": 2}),
            "nested": json.dumps({**cfg, "model": {**cfg["model"], "n_heads": 2.0}}),
            "latin1": cfg_text.replace('"vanilla"', '"vanill\u00e9"').encode("latin-1"),
        },
        "world.json": {
            "notjson": "{",
            "list": "[0]",
            "type": json.dumps({**wjson, "n_labels": "4"}),
            "unknown": json.dumps({**wjson, "colour": "red"}),
            "dup": json.dumps(wjson)[:-1] + ', "seed": 0}',
            "inf": json.dumps({**wjson, "noise": float("inf")}),
            "noise out of range": json.dumps({**wjson, "noise": 5.0}),
        },
    }
    worlds = []
    for fname, variants in edits.items():
        for name, text in variants.items():
            d = m / f"world-{fname.split('.')[0]}-{name.replace(' ', '-')}"
            shutil.copytree(world, d)
            _write(d / fname, text)
            cmd = [*world_args, str(d)] if fname == "train_config.json" else ["world", "tasks", str(d)]
            worlds.append((f"{fname} hand-edited: {name}", cmd))

    # reproduce folders with hand-edited unit results (tmp/rep is the table's one-unit sweep)
    rep = tmp / "rep"
    assert (rep / "sweep.json").is_file(), "tests/test_robustness.py builds tmp/rep first"
    unit = Path("units") / "compare-sst2-s1" / "result.json"
    reports = []
    for name, text in (("string", '"done"'), ("number", "1"), ("nounit", '{"result": {}}'),
                       ("empty", ""), ("null", "null")):
        d = m / f"rep-{name}"
        shutil.copytree(rep, d)
        (d / unit).write_text(text)
        reports.append((f"unit result hand-edited: {name}", ["report", str(d)]))
    reports += [
        ("report on a missing folder", ["report", str(m / "nowhere")]),
        ("report on a file", ["report", str(m / "afile")]),
        ("report without a folder", ["report"]),
    ]

    # ----------------------------------------------------------------- models and corpora
    import torch

    from iclgd.core.models import build_tiny

    mm = m / "models"
    llama = build_tiny("tiny-random-llama")
    llama.model.save_pretrained(mm / "bigtok")  # llama's weights, its tokenizer grown by 20 tokens
    tok = build_tiny("tiny-random-llama").tokenizer
    tok.add_tokens([f"<extra{i}>" for i in range(20)])
    tok.save_pretrained(mm / "bigtok")
    gpt2 = build_tiny("tiny-random-gpt2")
    gpt2.model.save_pretrained(mm / "gpt2")
    gpt2.tokenizer.save_pretrained(mm / "gpt2")
    torch.save(gpt2.model.state_dict(), mm / "gpt2.pt")
    _write(mm / "afile", "x")
    models = [
        ("tokenizer larger than the embedding", ["eval", "--model", str(mm / "bigtok"), "--n-test", "2", "--k", "2"]),
        ("compare with a tokenizer larger than the embedding", ["compare", "--model", str(mm / "bigtok"),
                                                                "--n-test", "2", "--k", "2"]),
        ("compare-updates across architectures (model names)", ["dual", "compare-updates", "--before",
                                                                "tiny-random-gpt2", "--after", "tiny-random-llama"]),
        ("compare-updates --after a state dict of another architecture",
         ["dual", "compare-updates", "--before", "tiny-random-llama", "--after", str(mm / "gpt2.pt")]),
        ("compare-updates --after a model folder of another architecture",
         ["dual", "compare-updates", "--before", "tiny-random-llama", "--after", str(mm / "gpt2")]),
        ("model path a file", ["eval", "--model", str(mm / "afile"), "--n-test", "2"]),
    ]
    corpus_latin = _write(m / "corpus-latin1.txt", "".join(f"line {i} caf\u00e9\n" for i in range(300)).encode("latin-1"))
    short = _write(m / "corpus-short.txt", "".join(f"line {i}: the quick brown fox jumps over dog\n" for i in range(40)))
    tinyc = _write(m / "corpus-tiny.txt", "one\ntwo\n")
    corpora = [
        ("corpus not UTF-8", ["pretrain", "--config", "tiny", "--steps", "1", "--corpus", corpus_latin,
                              "--out", str(m / "c1")]),
        ("corpus whose validation part is shorter than a block",
         ["pretrain", "--config", "tiny", "--steps", "1", "--corpus", short, "--out", str(m / "c2")]),
        ("corpus too short to split", ["pretrain", "--config", "tiny", "--steps", "1", "--corpus", tinyc,
                                       "--out", str(m / "c3")]),
        ("corpus a folder", ["pretrain", "--config", "tiny", "--steps", "1", "--corpus", str(mm),
                             "--out", str(m / "c4")]),
        ("momentum apply corpus not UTF-8", ["momentum", "apply", *tiny, "--n-test", "1", "--corpus", corpus_latin]),
    ]
    return specs + data + opts + runs + worlds + reports + models + corpora + found_later(m, data_dir, tiny, small)


def found_later(m: Path, data_dir: Path, tiny: list[str], small: list[str]) -> list[tuple[str, list[str]]]:
    """Inputs that a first pass of this table found unhandled (a traceback, exit 0, a misleading line), now one
    line each."""
    import transformers as T

    from iclgd.core.models import byte_tokenizer

    f = m / "found"
    f.mkdir()
    cfg = T.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       vocab_size=259)
    T.BertForMaskedLM(cfg).save_pretrained(f / "bert")
    byte_tokenizer().save_pretrained(f / "bert")
    T.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=259).save_pretrained(f / "t5")
    spec = _spec(f, "good", data_dir)
    (f / "adir").mkdir()
    _write(f / "afile", "x")
    same = _spec(f, "same-via-dots", data_dir, eval_file=str(data_dir / "sst2" / ".." / "sst2" / "glue_train.jsonl"))
    mom = ["momentum", "compare", "--config", "tiny", "--steps", "1", "--seeds", "1", "--out", str(f / "mom")]
    return [
        ("an encoder (BERT) given as a causal LM", ["eval", "--model", str(f / "bert"), "--n-test", "2", "--k", "2"]),
        ("an encoder-decoder (T5) folder", ["eval", "--model", str(f / "t5"), "--n-test", "2", "--k", "2"]),
        ("hub corpus unavailable offline", ["pretrain", "--config", "tiny", "--steps", "1", "--corpus",
                                           "hf:nobody/nothing", "--out", str(f / "hf")]),
        ("--task beside --task-spec", ["eval", *small, "--task", "cb", "--task-spec", spec]),
        ("the same task twice", ["eval", *small, "--tasks", "sst2,sst2"]),
        ("--lr beside --lr-search", ["compare", *small, "--lr-search", "--lr", "0.1"]),
        ("--untrained-reinit without the control", ["compare", *small, "--no-untrained", "--untrained-reinit",
                                                    "all"]),
        ("--learnable-eta with no momentum variant", [*mom, "--learnable-eta", "--variants", "vanilla,ema"]),
        ("--eta with no momentum variant", [*mom, "--eta", "0.5", "--variants", "vanilla,ema"]),
        ("compare-updates --after a missing file", ["dual", "compare-updates", "--before", "tiny-random-llama",
                                                    "--after", str(f / "nowhere.pt")]),
        ("compare-updates --before a missing folder", ["dual", "compare-updates", "--before", str(f / "nowhere"),
                                                       "--after", "tiny-random-llama"]),
        ("dual verify given two tasks", ["dual", "verify", *tiny, "--k", "2", "--tasks", "sst2,cb"]),
        ("demo file equal to the eval file through ..", ["eval", *small, "--task-spec", same]),
        ("--task-spec a folder", ["eval", *small, "--task-spec", str(f / "adir")]),
        ("a spec's eval_file a folder", ["eval", *small, "--task-spec", _spec(f, "evaldir", data_dir,
                                                                                eval_file=str(f / "adir"))]),
        ("--data-dir a file", ["eval", *small, "--data-dir", str(f / "afile")]),
        ("--model an empty string", ["eval", "--model", "", "--n-test", "2"]),
    ]


def _data_demo(m: Path, name: str, demo: bytes) -> str:
    d = m / "data" / name / "sst2"
    d.mkdir(parents=True)
    (d / "glue_train.jsonl").write_bytes(demo)
    (d / "dev.jsonl").write_text('{"text": "fine", "label": 0}\n{"text": "great", "label": 1}\n')
    return str(d.parent)
