"""Families derived with no entry of their own, end to end through the CLI."""

import json

from typer.testing import CliRunner

from iclgd.cli import app


def test_dual_verify_on_a_sliding_window_family_says_which_layers_are_windowed(tmp_path):
    res = CliRunner().invoke(app, ["dual", "verify", "--model", "tiny-random-gemma3", "--task", "sst2", "--k", "2",
                                   "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "OK" in res.output and "sliding-window layers 0 (window [8])" in res.output
    doc = json.loads((tmp_path / "dual_verify.json").read_text())
    assert doc["config"]["sliding_windows"] == {"0": 8} and doc["config"]["n_tokens"] > 8
    assert doc["summary"]["recon_max"] <= 1e-6  # float64: our q/k/v reproduce Gemma's own heads, window included


def test_compare_runs_on_derived_families(tmp_path):
    for name in ("tiny-random-phi3", "tiny-random-olmo2"):
        res = CliRunner().invoke(app, ["compare", "--model", name, "--task", "cb", "--k", "2", "--n-test", "3",
                                       "--out", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
        doc = json.loads((tmp_path / name / "results.json").read_text())
        s = doc["seeds"][0]
        assert (s["n"], s["k_true"], len(s["ft_losses"])) == (3, 2, 2)  # one K/V SGD step per demonstration
        assert len(s["simam"]["icl_ft"]["per_layer"]) == 2  # captures on both layers


def test_a_modeling_function_wrapped_in_a_kernel_module_is_read_through_its_forward(monkeypatch, tmp_path):
    """transformers 5.25 with `kernels` makes apply_rotary_pos_emb an nn.Module (a hub-kernel slot, signature
    (*args, **kwargs)) whose forward is the original; the layout reads the convention from that forward, and the
    dual form still holds to float64 precision through it."""
    import torch
    from transformers.models.llama import modeling_llama

    original = modeling_llama.apply_rotary_pos_emb
    original = getattr(original, "forward", original)

    class Slot(torch.nn.Module):
        def forward(self, q, k, cos, sin, unsqueeze_dim=1):
            return original(q, k, cos, sin, unsqueeze_dim)

    slot = Slot()
    slot.forward = original  # as the kernels package does: the slot's forward is the function itself
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", slot)
    res = CliRunner().invoke(app, ["dual", "verify", "--model", "tiny-random-llama", "--task", "sst2", "--k", "2",
                                   "--out", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "d" / "dual_verify.json").read_text())
    assert doc["summary"]["identity_max"] < 1e-10 and doc["summary"]["recon_max"] < 1e-10
