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


def test_gemma3_layout_is_derived(gemma):
    lay = gemma.layout
    assert lay is not None and lay.qk_norm == ("q_norm", "k_norm") and lay.qk_norm_per_head
    assert lay.rotary_by_layer_type and gemma.head_counts() == (4, 1, 256)
    assert gemma.scale(0) == 256 ** -0.5  # query_pre_attn_scalar = head_dim here, read from the module
    windows = [gemma.window(l) for l in range(gemma.n_layers)]
    assert windows == [None if (l + 1) % 6 == 0 else 512 for l in range(18)]  # 5 local layers, then a global one


def test_gemma3_reconstruction_across_the_sliding_window(gemma):
    """Our q/k/v (norms, local/global rotary, GQA 4:1, the 512-token window) give Gemma's own per-head
    attention output at the last position of a 600-token prompt, on a local and a global layer."""
    import torch

    from iclgd.engine import dual

    ids = [gemma.bos_id] + [int(t) for t in torch.randint(1000, 20000, (599,), generator=torch.Generator().manual_seed(0))]
    rows = dual.verify_layers(gemma, ids, (1, 500), layers=[4, 5])
    assert {r["layer"] for r in rows} == {4, 5} and len(rows) == 8
    assert max(r["recon_rel_err"] for r in rows) <= 1e-4
    assert max(r["identity_rel_err"] for r in rows) <= 1e-3
    # the local layer sees only the last 512 tokens, so part of the demonstrations is outside ΔW_ICL there
    kv_local = dual.project_heads(gemma, 4, dual.capture_layer_io(gemma, ids)[0][4], torch.arange(600))
    assert kv_local.start == 600 - 512 and kv_local.k.shape[1] == 512
