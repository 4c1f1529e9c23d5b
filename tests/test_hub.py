"""Hub ids on both paths, offline: a model in a local Hugging Face hub cache (built here, in the hub's own
layout) loads by its id, one-part (``gpt2``-style) or ``owner/name``; one that is not cached is refused in one
line naming the offline switch; the data sets' hub path reads a local data set folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T

from iclgd.core.models import byte_tokenizer, tiny_configs

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_model(cache: Path, repo_id: str) -> None:
    """models--{owner}--{name}/refs/main and snapshots/<commit>/ as huggingface_hub lays out a download."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    snap = root / "snapshots" / COMMIT
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(tiny_configs()["tiny-random-gpt2"]).save_pretrained(snap)
    byte_tokenizer().save_pretrained(snap)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)


def _iclgd(args, env, data_dir):
    code = "import sys; from iclgd.cli import app; sys.argv = ['iclgd', *sys.argv[1:]]; app()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                          env={**env, "ICLGD_DATA_DIR": str(data_dir)})


@pytest.fixture(scope="module")
def hub_env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hub")
    for rid in ("someone/tiny-gpt2", "tinygpt2"):
        _cache_model(cache, rid)
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    return {**env, "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / "home")}


@pytest.mark.parametrize("repo_id", ["someone/tiny-gpt2", "tinygpt2"])
def test_a_cached_hub_model_loads_by_its_id_offline(hub_env, repo_id, data_dir, tmp_path):
    r = _iclgd(["--offline", "eval", "--model", repo_id, "--tasks", "sst2", "--k", "1", "--n-test", "2",
                "--out", str(tmp_path)], hub_env, data_dir)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "results.json").read_text())["config"]
    assert cfg["model"] == repo_id and cfg["model_source"] == f"hub {repo_id}" and cfg["device"] == "cpu"


def test_an_uncached_hub_model_offline_names_the_switch(hub_env, data_dir):
    r = _iclgd(["--offline", "eval", "--model", "nobody/not-cached", "--n-test", "1"], hub_env, data_dir)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "--offline" in r.stderr and "HF_HUB_OFFLINE=1" in r.stderr and "nobody/not-cached" in r.stderr
    r = _iclgd(["eval", "--model", "gpt-17", "--n-test", "1"], {**hub_env, "HF_HUB_OFFLINE": "1"}, data_dir)
    assert r.returncode == 2 and "unknown model offline" in r.stderr  # a one-part id is a hub id too


def test_the_data_sets_hub_path_reads_a_data_set(tmp_path):
    """``load_split`` with no data directory goes to ``datasets.load_dataset``; here on a local data set folder
    (the same call a hub id makes online), columns renamed as the spec's hub source says."""
    from iclgd.core.tasks import TASKS, HubSource, load_task

    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": f"good {i}", "y": i % 2}) + "\n"
                                                  for i in range(6)))
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps({"text": f"bad {i}", "y": 1 - i % 2}) + "\n"
                                                       for i in range(4)))
    from dataclasses import replace

    spec = replace(TASKS["sst2"], hub=HubSource(path=str(tmp_path), name=None, demo_split="train",
                                               eval_split="validation", columns={"text": "text", "label": "y"}))
    data = load_task(spec, data_dir=None)
    assert len(data.demo_pool) == 6 and len(data.eval_rows) == 4
    assert {r["text"] for r in data.eval_rows} == {f"bad {i}" for i in range(4)}
    assert all(r["label"] == 1 - int(r["text"].split()[1]) % 2 for r in data.eval_rows)
    assert spec.format_input(data.eval_rows[0]).startswith("Sentence: bad ")
