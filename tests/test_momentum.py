import math

import pytest
import torch

from iclgd.core.errors import IclgdError
from iclgd.core.models import load_model
from iclgd.engine.momentum import ema_before, enable_momentum, momentum_attention_forward


def naive_ema(v, eta):
    """s_t = Σ_{i<t} η_h^{t-i} v_i with explicit loops over positions."""
    B, H, S, d = v.shape
    out = torch.zeros_like(v)
    for h in range(H):
        for t in range(S):
            for i in range(t):
                out[:, h, t] += eta[h] ** (t - i) * v[:, h, i]
    return out


@pytest.mark.parametrize("S,chunk", [(1, 4), (7, 4), (8, 4), (13, 64), (33, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ema_matches_naive_loop(S, chunk, dtype):
    g = torch.Generator().manual_seed(S)
    v = torch.randn(2, 3, S, 5, generator=g, dtype=dtype)
    eta = torch.tensor([0.9, 0.5, 0.99], dtype=dtype)
    got = ema_before(v, eta.log(), chunk=chunk)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, naive_ema(v, eta), rtol=tol, atol=tol)


def test_ema_long_sequence_does_not_overflow():
    v = torch.ones(1, 1, 5000, 2)
    out = ema_before(v, torch.tensor([math.log(0.9)]))
    assert torch.isfinite(out).all()
    # geometric series: Σ_{n=1}^{t} 0.9^n -> 9 for long t
    assert out[0, 0, -1, 0].item() == pytest.approx(9.0, rel=1e-5)


class _Mod(torch.nn.Module):
    is_causal = True

    def __init__(self, eta):
        super().__init__()
        self.momentum_eta = eta


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_function_matches_naive_with_padding(dtype):
    """Softmax attention + EMA, position by position, against the registered function; row 0 left-padded."""
    g = torch.Generator().manual_seed(0)
    B, H, T, d = 2, 2, 6, 4
    q, k, v = (torch.randn(B, H, T, d, generator=g, dtype=dtype) for _ in range(3))
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[0, :2] = False  # two pad tokens before row 0's real ones
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    mask = (causal[None] & keep[:, None, :])[:, None]  # (B, 1, T, T)
    out, _ = momentum_attention_forward(_Mod(0.8), q, k, v, mask, scaling=d ** -0.5, dropout=0.0)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                if not keep[b, t]:
                    continue
                allowed = mask[b, 0, t]
                s = (q[b, h, t] @ k[b, h].T) * d ** -0.5
                p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
                expected = p @ v[b, h]
                for i in range(t):
                    if keep[b, i]:
                        expected = expected + 0.8 ** (t - i) * v[b, h, i]
                tol = 1e-10 if dtype == torch.float64 else 1e-5
                torch.testing.assert_close(out[b, t, h], expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gpt2", "tiny-random-qwen3"])
def test_kv_cache_generation_equals_full_forward(name):
    lm = load_model(name)
    enable_momentum(lm, eta=0.9)
    ids = torch.tensor([[5, 17, 30, 2, 99, 64, 12, 8, 41, 3]])
    with torch.no_grad():
        full = lm.model(input_ids=ids).logits
        out = lm.model(input_ids=ids[:, :4], use_cache=True)
        steps = [out.logits]
        cache = out.cache
        for t in range(4, ids.shape[1]):
            out = lm.model(input_ids=ids[:, t: t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    # and the EMA matters: vanilla attention gives other logits
    van = load_model(name)
    with torch.no_grad():
        assert not torch.allclose(van.model(input_ids=ids).logits, full, atol=1e-3)


def test_left_padded_batch_equals_unpadded():
    lm = load_model("tiny-random-llama")
    enable_momentum(lm, eta=0.7)
    ids = torch.tensor([[5, 17, 30, 2, 99]])
    padded = torch.tensor([[258, 258, 5, 17, 30, 2, 99]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        a = lm.model(input_ids=ids).logits
        b = lm.model(input_ids=padded, attention_mask=mask, position_ids=pos).logits[:, 2:]
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_gradient_reaches_learnable_eta():
    lm = load_model("tiny-random-gpt2")
    enable_momentum(lm, eta=0.9, learnable=True)
    theta = lm.attention(0).momentum_theta
    assert torch.sigmoid(theta).allclose(torch.full_like(theta, 0.9))
    loss = lm.model(input_ids=torch.tensor([[5, 6, 7, 8, 9, 10]]), labels=torch.tensor([[5, 6, 7, 8, 9, 10]])).loss
    loss.backward()
    assert theta.grad is not None and torch.count_nonzero(theta.grad) == theta.numel()
    # the EMA's derivative in log η is exact (finite differences, float64)
    v = torch.randn(1, 2, 9, 3, dtype=torch.float64)
    th = torch.tensor([0.3, -0.4], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ema_before(v, torch.nn.functional.logsigmoid(t), chunk=4), (th,))


@pytest.mark.parametrize("eta", [0.0, 1.0, -0.5, 1.5])
def test_eta_outside_unit_interval_is_an_error(eta):
    with pytest.raises(IclgdError, match="strictly between 0 and 1"):
        enable_momentum(load_model("tiny-random-gpt2"), eta=eta)


def test_model_without_attention_interface_is_refused():
    with pytest.raises(IclgdError, match="gpt_neo"):
        enable_momentum(load_model("tiny-random-gpt-neo"), eta=0.9)
