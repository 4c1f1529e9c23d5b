"""Momentum beyond Eq. 9 (issue 23): the authors' code variant (a learnable multi-component EMA over the values,
``kind="ema"``) and Eq. 9 with a learnable gate initialised at 0; both drop-in, cached, saved and restored."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from iclgd.cli import app
from iclgd.core.models import load_model
from iclgd.engine.momentum import EMA_COMPONENTS, ema_conv, ema_kernel, enable_momentum


def test_ema_kernel_and_conv_equal_the_definition():
    g = torch.Generator().manual_seed(0)
    H, d, N, S = 2, 3, EMA_COMPONENTS, 11
    delta, gamma = 0.2 * torch.randn(H, d, N, generator=g), torch.randn(H, d, N, generator=g)
    v = torch.randn(2, H, S, d, generator=g)
    p = torch.sigmoid(delta)
    k = ema_kernel(torch.nn.functional.logsigmoid(delta), gamma, S)
    for l in (0, 1, 5):  # k_c(l) = Σ_n γ N^-1/2 p^l
        torch.testing.assert_close(k[..., l], (gamma * N ** -0.5 * p ** l).sum(-1), rtol=1e-5, atol=1e-6)
    out = ema_conv(v, k)
    for t in (0, 4, S - 1):  # the current position included, nothing after it
        want = sum(k[:, :, t - i][None] * v[:, :, i] for i in range(t + 1))
        torch.testing.assert_close(out[:, :, t], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,gate", [("ema", False), ("eq9", True)])
def test_cached_generation_equals_full_forward(kind, gate):
    lm = load_model("tiny-random-llama")
    enable_momentum(lm, eta=0.1, learnable=gate, kind=kind, gate=gate, seed=3)
    if gate:  # a gate of 0 would hide the EMA: open it
        for l in range(lm.n_layers):
            lm.attention(l).momentum_gate.data.fill_(0.7)
    ids = torch.tensor([[5, 17, 30, 2, 99, 64, 12, 8, 41, 3]])
    with torch.no_grad():
        full = lm.model(input_ids=ids).logits
        out = lm.model(input_ids=ids[:, :4], use_cache=True)
        steps, cache = [out.logits], out.cache
        for t in range(4, ids.shape[1]):
            out = lm.model(input_ids=ids[:, t: t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
        van = load_model("tiny-random-llama").model(input_ids=ids).logits
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(van, full, atol=1e-4)  # the EMA changes the model


def test_gate_at_init_is_vanilla_and_learns():
    lm = load_model("tiny-random-llama")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        van = lm.model(input_ids=ids).logits
    enable_momentum(lm, eta=0.1, learnable=True, gate=True)
    assert torch.equal(lm.model(input_ids=ids).logits.detach(), van)  # g = 0: exactly vanilla attention
    lm.model(input_ids=ids, labels=ids).loss.backward()
    gate = [lm.attention(l).momentum_gate for l in range(lm.n_layers)]
    theta = [lm.attention(l).momentum_theta for l in range(lm.n_layers)]
    assert all(torch.count_nonzero(g.grad) > 0 for g in gate)  # the gate learns from the first step
    assert all(t.grad is None or torch.count_nonzero(t.grad) == 0 for t in theta)  # η only once the gate opens
    with torch.no_grad():
        for g in gate:
            g -= 0.1 * g.grad
    lm.model.zero_grad()
    lm.model(input_ids=ids, labels=ids).loss.backward()
    assert all(torch.count_nonzero(t.grad) > 0 for t in theta)


def test_ema_parameters_get_gradients_and_are_seeded():
    a, b = load_model("tiny-random-llama"), load_model("tiny-random-llama")
    enable_momentum(a, kind="ema", seed=1), enable_momentum(b, kind="ema", seed=2)
    assert not torch.equal(a.attention(0).ema_delta, b.attention(0).ema_delta)
    c = load_model("tiny-random-llama")
    enable_momentum(c, kind="ema", seed=1)
    assert torch.equal(a.attention(1).ema_gamma, c.attention(1).ema_gamma)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    a.model(input_ids=ids, labels=ids).loss.backward()
    assert torch.count_nonzero(a.attention(0).ema_delta.grad) > 0 and torch.count_nonzero(a.attention(0).ema_gamma.grad) > 0


@pytest.mark.parametrize("args", [["--attention", "ema"], ["--attention", "momentum", "--eta", "0.1",
                                                           "--learnable-eta", "--gate"]])
def test_world_model_with_a_variant_saves_and_restores(tmp_path, args):
    res = CliRunner().invoke(app, ["world", "train", "--size", "tiny", "--steps", "3", *args, "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "train_config.json").read_text())
    assert cfg["attention"] == args[1] and cfg["gate"] == ("--gate" in args)
    lm = load_model(str(tmp_path / "model"))  # the variant comes back with its learned parameters
    attn = lm.attention(0)
    assert (hasattr(attn, "ema_delta") if args[1] == "ema" else hasattr(attn, "momentum_gate"))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "model" / "model.safetensors"))
    key = next(k for k in saved if k.endswith("ema_delta" if args[1] == "ema" else "momentum_gate"))
    torch.testing.assert_close(dict(lm.model.named_parameters())[key], saved[key])


def test_gate_without_eq9_is_refused(tmp_path):
    res = CliRunner().invoke(app, ["world", "train", "--size", "tiny", "--attention", "ema", "--gate",
                                   "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--gate: takes effect only with --attention momentum" in res.output
    assert not any(tmp_path.iterdir())


def test_momentum_compare_variants_are_checked_vanilla_first():
    from iclgd.core.errors import IclgdError
    from iclgd.experiments.momentum import MomentumConfig

    assert MomentumConfig(variants="vanilla,momentum,ema").variants == ("vanilla", "momentum", "ema")
    for bad, msg in (("momentum,vanilla", "vanilla first"), ("vanilla", "vanilla first"),
                     ("vanilla,sparse", "'sparse' is not one of"), ("vanilla,ema,ema", "distinct")):
        with pytest.raises(IclgdError, match=msg):
            MomentumConfig(variants=bad)


def test_momentum_compare_trains_each_variant_paired_with_vanilla(tmp_path):
    res = CliRunner().invoke(app, ["momentum", "compare", "--size", "tiny", "--steps", "2", "--seeds", "1",
                                   "--variants", "vanilla,ema", "--lengths", "16", "--corpus", "tinyshakespeare",
                                   "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["config"]["variants"] == ["vanilla", "ema"] and set(doc["runs"]) == {"vanilla-s1", "ema-s1"}
    assert "paired_diff_ema_minus_vanilla" in doc["summary"]["ppl@16"]
    assert json.loads((tmp_path / "ema-s1" / "config.json").read_text())["attention"] == "ema"
