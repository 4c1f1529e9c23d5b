import pytest
import torch

from iclgd.core.hooks import HOOK_POINTS, Recorder
from iclgd.core.models import tiny_configs


@pytest.mark.parametrize("name", list(tiny_configs()))
def test_every_hook_point_reads_what_its_name_says(name, tiny):
    """attn_heads → o_proj → attn_out, and a block's output is the next block's input, on every family."""
    lm = tiny(name)
    with torch.no_grad(), Recorder(lm, points=tuple(HOOK_POINTS)) as rec:
        lm.model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    H, _, hd = lm.head_counts()
    for l in range(lm.n_layers):
        heads, out = rec.acts[f"attn_heads.{l}"], rec.acts[f"attn_out.{l}"]
        assert heads.shape[:2] == (1, 4) and heads.shape[-1] == H * hd
        with torch.no_grad():
            torch.testing.assert_close(lm.o_proj(l)(heads), out)
        assert rec.acts[f"attn_in.{l}"].shape == out.shape
        if l + 1 < lm.n_layers:
            torch.testing.assert_close(rec.acts[f"block_in.{l + 1}"], rec.acts[f"block_out.{l}"])
    assert not lm.model._forward_hooks and all(not m._forward_hooks and not m._forward_pre_hooks
                                               for m in lm.model.modules())  # all removed on exit


def test_an_edit_replaces_the_input_and_unknown_points_are_refused(tiny):
    lm = tiny("tiny-random-llama")
    with torch.no_grad(), Recorder(lm, points=("block_out",), edit={"block_in": torch.zeros_like}) as rec:
        lm.model(input_ids=torch.tensor([[5, 6]]))
    with torch.no_grad(), Recorder(lm, points=("block_out",)) as plain:
        lm.model(input_ids=torch.tensor([[5, 6]]))
    assert not torch.allclose(rec.acts["block_out.1"], plain.acts["block_out.1"])
    with pytest.raises(ValueError, match="unknown hook point"):
        Recorder(lm, points=("mlp_out",))
