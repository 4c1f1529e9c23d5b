"""The second offline model: Gemma-3-270M (base), assembled from its packages and converted once into the cache."""

import pytest

from iclgd.engine.scoring import EvalConfig, evaluate
from iclgd.core.tasks import TASKS, load_task


@pytest.fixture(scope="module")
def gemma():
    from iclgd.core.models import load_model

    return load_model("gemma3-270m", need_layout=False)


def test_gemma3_loads_offline_with_its_own_start_token(gemma):
    assert gemma.model_type == "gemma3_text" and gemma.model.config.num_hidden_layers == 18
    assert gemma.start == "<bos>" and gemma.bos_id == gemma.tokenizer.bos_token_id == 2
    assert gemma.start_deviations() == ["start token '<bos>' instead of the paper's '</s>'"]
    assert not hasattr(gemma.model.config, "quantization_config")


def test_gemma3_eval_runs(gemma, data_dir):
    r = evaluate(gemma, load_task(TASKS["cb"], data_dir, n_test=3), EvalConfig(k=2), progress=False)
    assert r["k_true"] == 2 and len(r["records"]) == 3 and 0.0 <= r["acc_icl"] <= 1.0
