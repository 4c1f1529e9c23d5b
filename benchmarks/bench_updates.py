"""The ΔW statistics of a compare unit (ΔW_ICL vs ΔW_FT per layer and head, with the random-update baseline), timed
side by side in one run: the former way (each KV matrix repeated to its query heads, and R's H·d² Gaussian entries
drawn per example and layer) against `iclgd.engine.dual.update_stats` (once per KV matrix; the baseline's cosines
drawn from their exact law), at the shapes of SmolLM2-135M and Gemma-3-270M, for 100 test examples (compare's
default --updates-n). Random tensors: the time does not depend on the values.

    python benchmarks/bench_updates.py [--n 100] [--repeat 3]
"""

import argparse
import time

import torch

from iclgd.core.models.attention import repeat_kv
from iclgd.engine import dual

SHAPES = {"smollm2-135m": dict(L=30, H=9, Hkv=3, d=64), "gemma3-270m": dict(L=18, H=4, Hkv=1, d=256)}


def former(dW_icl, dW_ft, q, g):
    """update_stats as it was before 0.3 (the same figures; the baseline drawn through R itself)."""
    H = q.shape[-2]
    dW_icl = repeat_kv(dW_icl.double(), H // dW_icl.shape[-3], dim=-3)
    dW_ft = repeat_kv(dW_ft.double(), H // dW_ft.shape[-3], dim=-3)
    eff_icl = torch.einsum("...hde,...he->...hd", dW_icl, q)
    out = {"cos_dW": dual._cos_nan(dW_ft.flatten(-2), dW_icl.flatten(-2)),
           "norm_ratio_ft_over_icl": dW_ft.flatten(-2).norm(dim=-1) / dW_icl.flatten(-2).norm(dim=-1),
           "cos_effect_on_q": dual._cos_nan(torch.einsum("...hde,...he->...hd", dW_ft, q), eff_icl)}
    R = torch.randn(dW_ft.shape, generator=g, dtype=torch.float64)
    out["cos_dW_random"] = dual._cos_nan(R.flatten(-2), dW_icl.flatten(-2))
    out["cos_effect_random"] = dual._cos_nan(torch.einsum("...hde,...he->...hd", R, q), eff_icl)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.n} examples, best of {a.repeat}")
    print(f"{'model shapes':<14} {'former (s)':>10} {'now (s)':>8} {'speed-up':>8}  deterministic figures equal")
    for name, s in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        dW_icl = torch.randn(s["L"], s["Hkv"], s["d"], s["d"], generator=g, dtype=torch.float64)
        fts = [torch.randn(s["L"], s["Hkv"], s["d"], s["d"], generator=g, dtype=torch.float64) for _ in range(a.n)]
        qs = [torch.randn(s["L"], s["H"], s["d"], generator=g, dtype=torch.float64) for _ in range(a.n)]
        times = {}
        for label, fn in (("former", former), ("now", dual.update_stats)):
            best = float("inf")
            for _ in range(a.repeat):
                gen = torch.Generator().manual_seed(1)
                t0 = time.perf_counter()
                outs = [fn(dW_icl, ft, q, gen) for ft, q in zip(fts, qs)]
                best = min(best, time.perf_counter() - t0)
            times[label], last = best, outs[-1]
            if label == "former":
                ref = last
        same = all(torch.allclose(ref[k], last[k], rtol=1e-12, atol=1e-14)
                   for k in ("cos_dW", "norm_ratio_ft_over_icl", "cos_effect_on_q"))
        print(f"{name:<14} {times['former']:>10.2f} {times['now']:>8.2f} {times['former'] / times['now']:>7.1f}x  {same}")


if __name__ == "__main__":
    main()
