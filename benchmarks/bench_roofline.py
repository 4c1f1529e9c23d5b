"""How close each phase of a compare unit comes to what the machine can do: its FLOPs over its wall time, against the
machine's fp32 GEMM rate at the model's own matrix shapes, measured in the same process with the same threads.

    python benchmarks/bench_roofline.py [--models smollm2-135m,gemma3-270m] [--task sst2] [--k 32] [--n-test 100]

1. GEMM rate: every weight matrix of the model (each layer's projections and MLP, and the unembedding), x @ Wᵀ in
   fp32 with x of M rows, M = a finetuning step's tokens (a demonstration and the start token, ~20), 256 (a scoring
   batch: 8 rows of ~30 tokens) and 1024 (a prefix); the rate is all the matrices' FLOPs over their summed time (best
   of 5), each product repeated, so its weight stays in the cache. The reference rate of the model is the best of
   the three M. The same products are then timed over the model's own weight tensors in forward order, one pass
   reading each once ("streamed"): at ~20 rows a product does ~10 FLOPs per weight byte, so it is bound by how fast
   the weights come from memory, which the cached rate hides; the GB/s of weights read are printed beside it.
2. Phases of one compare unit (the unit's own functions, seed 1), each run twice: timed, then counted under
   ``torch.utils.flop_counter.FlopCounterMode`` (every matmul it executes, from the shapes, padding included;
   attention through the CPU's fused SDPA kernel counted with torch's own SDPA formula): prefix encoding; ZSL
   scoring; ICL scoring of the test suffixes after the cached prefix (the ICL pass minus its prefix); the FT steps;
   the captures (the three passes with the metrics' captures minus the same passes without). The ΔW statistics
   and the metrics run in float64 NumPy/torch on small arrays and are reported as time only.
3. The unit as a whole: every counted phase's FLOPs over the unit's wall time (compare_seed, which also runs the ΔW
   statistics and the metrics).
Printed per phase: GFLOP, seconds, GFLOP/s, the fraction of the reference rate, of the GEMM rate at the phase's own M
(what its matrix shapes allow) and of the streamed rate at its own M (what they allow with the weights in memory);
then the FT steps' floor at that streamed rate.
"""

import argparse
import time
import warnings

warnings.filterwarnings("ignore")


def _register_cpu_sdpa():
    """FlopCounterMode counts the CUDA SDPA kernels; the CPU's fused kernel gets torch's same formula here."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in fc.flop_registry:
        return

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _matrices(lm) -> list[tuple[int, int]]:
    """(d_in, d_out) of every weight matrix a forward pass multiplies by, once per use."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    out = []
    for block in lm.blocks():
        for m in block.modules():
            if isinstance(m, nn.Linear):
                out.append((m.in_features, m.out_features))
            elif isinstance(m, Conv1D):
                out.append(tuple(m.weight.shape))  # Conv1D stores (d_in, d_out)
    head = lm.model.get_output_embeddings()
    out.append((head.weight.shape[1], head.weight.shape[0]))
    return out


def gemm_rate(lm, M: int, repeat: int = 5) -> float:
    """GFLOP/s of x @ Wᵀ (fp32) over every matrix of the model with x of M rows (best of ``repeat``)."""
    import torch

    mats = {}
    for d_in, d_out in _matrices(lm):
        mats[(d_in, d_out)] = mats.get((d_in, d_out), 0) + 1
    flops, secs = 0.0, 0.0
    g = torch.Generator().manual_seed(0)
    for (d_in, d_out), count in mats.items():
        x, W = torch.randn(M, d_in, generator=g), torch.randn(d_out, d_in, generator=g)
        x @ W.T  # warm-up
        best = min(_timed(lambda: x @ W.T) for _ in range(repeat))
        flops += count * 2 * M * d_in * d_out
        secs += count * best
    return flops / secs / 1e9


def streamed_rate(lm, M: int, repeat: int = 5) -> tuple[float, float]:
    """(GFLOP/s, GB/s of weights read) of x @ Wᵀ (fp32) over the model's own weight tensors in forward order, each
    once per pass, with x of M rows (best of ``repeat`` passes): what a forward pass's products can do when, as in the
    model, each matrix comes from memory rather than from the cache a repeated product keeps it in."""
    import torch
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    Ws = []
    for block in lm.blocks():
        for m in block.modules():
            if isinstance(m, nn.Linear):
                Ws.append(m.weight)
            elif isinstance(m, Conv1D):
                Ws.append(m.weight.T)  # Conv1D stores (d_in, d_out); x @ W computes the same product
    Ws.append(lm.model.get_output_embeddings().weight)
    g = torch.Generator().manual_seed(0)
    xs = {W.shape[1]: torch.randn(M, W.shape[1], generator=g, dtype=W.dtype) for W in Ws}
    flops = sum(2 * M * W.shape[0] * W.shape[1] for W in Ws)
    nbytes = sum(W.numel() * W.element_size() for W in Ws)

    def one_pass():
        for W in Ws:
            xs[W.shape[1]] @ W.T

    one_pass()  # warm-up
    best = min(_timed(one_pass) for _ in range(repeat))
    return flops / best / 1e9, nbytes / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _counted(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def unit_passes(lm, data, cfg, seed: int = 1) -> tuple[dict, object, object, list[list[int]]]:
    """The passes of one compare unit as ``compare_seed`` runs them, each as a callable by name, with and without the
    metrics' captures (what the captures keep, as the unit keeps it); and the ICL and ZSL prompts and the
    demonstrations' tokens."""
    from iclgd.core.tasks import sample_demos
    from iclgd.engine.finetune import Snapshot, finetune
    from iclgd.engine.scoring import build_prompts, encode_prefix, score_options
    from iclgd.experiments import compare as C

    demos = sample_demos(data.demo_pool, cfg.k, seed, cfg.balanced, len(data.spec.label_words))
    icl = build_prompts(lm, data.spec, demos, data.eval_rows, cfg.separator, cfg.max_len)
    zsl = build_prompts(lm, data.spec, [], data.eval_rows, cfg.separator, cfg.max_len)
    demo_ids = [icl.prefix_ids[a:b] for a, b in icl.demo_spans]
    demo_pos = [i for a, b in icl.demo_spans for i in range(a, b)]
    n_upd, nk = min(cfg.updates_n, len(data.eval_rows)), min(cfg.kendall_n, len(data.eval_rows))
    lr = cfg.lr if cfg.lr is not None else data.spec.lr if data.spec.lr is not None else C.DEFAULT_LR
    bs = cfg.batch_size
    label_lens = C._label_lens(icl, cfg)

    def ft():
        snap = Snapshot(lm, cfg.ft_params)
        finetune(lm, demo_ids, lr, cfg.ft_params, cfg.ft_mode, label_lens=label_lens)
        return snap

    def ft_zsl(observe: bool):
        snap = ft()
        try:
            if observe:
                C._observed(lm, zsl, cfg, [], False, keep_q=nk, keep_kv=n_upd)
            else:
                score_options(lm, zsl, bs)
        finally:
            snap.restore()

    def ft_only():
        ft().restore()

    runs = {
        "prefix encoding": lambda: encode_prefix(lm, icl.prefix_ids),
        "ZSL scoring": lambda: score_options(lm, zsl, bs),
        "ICL pass": lambda: score_options(lm, icl, bs),
        "FT steps": ft_only,
        "FT + ZSL scoring": lambda: ft_zsl(False),
        "ZSL captured": lambda: C._observed(lm, zsl, cfg, [], False, keep_kv=n_upd),
        "ICL captured": lambda: C._observed(lm, icl, cfg, demo_pos, False, keep_q=n_upd, keep_demo=nk,
                                            keep_prefix_kv=n_upd > 0),
        "FT + ZSL captured": lambda: ft_zsl(True),
    }
    return runs, icl, zsl, demo_ids


def phases(lm, data, cfg, seed: int = 1) -> tuple[dict, dict]:
    """{phase: (FLOPs, seconds)} of one compare unit's compute phases, and the unit's own lap times."""
    from iclgd.experiments import compare as C

    runs, icl, zsl, demo_ids = unit_passes(lm, data, cfg, seed)
    runs["prefix encoding"]()  # warm-up (thread pools, lazy imports); each phase's counted run warms it too
    measured = {name: (_counted(fn), _timed(fn)) for name, fn in runs.items()}
    t0 = time.perf_counter()
    _, _, laps = C.compare_seed(lm, data, cfg, seed=seed, progress=False)
    unit_s = time.perf_counter() - t0
    pre = measured["prefix encoding"]
    sub = lambda a, b: (measured[a][0] - measured[b][0], measured[a][1] - measured[b][1])  # noqa: E731
    out = {
        "prefix encoding": pre,
        "ZSL scoring": measured["ZSL scoring"],
        "ICL suffix scoring": (measured["ICL pass"][0] - pre[0], measured["ICL pass"][1] - pre[1]),
        "FT steps": measured["FT steps"],
        "captures (3 passes)": tuple(sub("ZSL captured", "ZSL scoring")[i] + sub("ICL captured", "ICL pass")[i]
                                     + sub("FT + ZSL captured", "FT + ZSL scoring")[i] for i in range(2)),
    }
    # what the unit itself computes: ZSL, ICL (prefix + suffixes), FT, ZSL after FT, each pass with its captures
    unit_flops = (measured["ZSL captured"][0] + measured["ICL captured"][0] + measured["FT + ZSL captured"][0])
    return out, {"unit_s": unit_s, "unit_flops": unit_flops, "laps": laps,
                 "tokens": {"prefix": len(icl.prefix_ids), "demo_mean": sum(map(len, demo_ids)) / len(demo_ids),
                            "query_mean": sum(map(len, zsl.query_ids)) / len(zsl.query_ids)}}


OWN_M = {"prefix encoding": 1024, "ZSL scoring": 256, "ICL suffix scoring": 256, "FT steps": None,
         "captures (3 passes)": 256}  # FT: one demonstration's tokens (measured per task)


def _demo_tokens(lm, data, cfg, seed: int = 1) -> int:
    """The rows of a finetuning step's matrices: a demonstration's mean token count plus the start token."""
    from iclgd.core.tasks import sample_demos
    from iclgd.engine.scoring import build_prompts

    demos = sample_demos(data.demo_pool, cfg.k, seed, cfg.balanced, len(data.spec.label_words))
    icl = build_prompts(lm, data.spec, demos, data.eval_rows[:1], cfg.separator, cfg.max_len)
    return round(sum(b - a for a, b in icl.demo_spans) / len(icl.demo_spans)) + (lm.bos_id is not None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--n-test", type=int, default=100)
    args = ap.parse_args()
    import torch
    from transformers.utils import logging

    logging.set_verbosity_error()
    from iclgd.core.models import load_model
    from iclgd.core.tasks import TASKS, load_task, resolve_data_dir
    from iclgd.experiments.compare import CompareConfig

    _register_cpu_sdpa()
    data = load_task(TASKS[args.task], resolve_data_dir(None), n_test=args.n_test)
    cfg = CompareConfig(k=args.k)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; task {args.task}, k {args.k}, "
          f"n_test {args.n_test}, batch size {cfg.batch_size}", flush=True)
    for name in args.models.split(","):
        lm = load_model(name)
        demo_m = _demo_tokens(lm, data, cfg)
        own = {p: demo_m if m is None else m for p, m in OWN_M.items()}
        Ms = sorted(set(own.values()))
        rates = {M: gemm_rate(lm, M) for M in Ms}
        streamed = {M: streamed_rate(lm, M) for M in Ms}
        ref = max(rates.values())
        print(f"\n{name}: fp32 GEMM rate at its matrix shapes, each product repeated (weights in cache): "
              + ", ".join(f"M={M} {r:.0f} GFLOP/s" for M, r in rates.items()) + f" (reference {ref:.0f})", flush=True)
        print("  the same products over the model's own weights in forward order (weights from memory): "
              + ", ".join(f"M={M} {r:.0f} GFLOP/s ({bw:.1f} GB/s)" for M, (r, bw) in streamed.items()), flush=True)
        ph, unit = phases(lm, data, cfg)
        t = unit["tokens"]
        print(f"  tokens: prefix {t['prefix']}, a demonstration {t['demo_mean']:.0f} (with the start token "
              f"{demo_m}), a test input {t['query_mean']:.0f}")
        print(f"  {'phase':22s} {'GFLOP':>8s} {'s':>7s} {'GFLOP/s':>8s} {'of ref':>7s} {'of own-M':>9s} "
              f"{'of streamed own-M':>18s}")
        for p, (fl, s) in ph.items():
            r = fl / s / 1e9 if s > 0 else float("nan")
            print(f"  {p:22s} {fl / 1e9:8.1f} {s:7.2f} {r:8.1f} {r / ref:7.0%} {r / rates[own[p]]:9.0%} "
                  f"{r / streamed[own[p]][0]:18.0%}  (own M = {own[p]})")
        fl_ft, s_ft = ph["FT steps"]
        floor = fl_ft / (streamed[demo_m][0] * 1e9)
        print(f"  FT steps at the streamed rate of their own M would take {floor:.2f} s (each step reads every weight "
              f"at least twice, forward and backward): {s_ft / floor:.1f}x that now")
        r = unit["unit_flops"] / unit["unit_s"] / 1e9
        laps = unit["laps"]
        rest = sum(laps.get(k, 0) for k in ("updates", "metrics_kendall", "metrics_similarities"))
        print(f"  {'compare unit':22s} {unit['unit_flops'] / 1e9:8.1f} {unit['unit_s']:7.2f} {r:8.1f} {r / ref:7.0%}"
              f"   (its ΔW statistics and metrics, {rest:.1f} s, count no FLOPs)")
        print(f"  unit laps (s): " + ", ".join(f"{k} {v:.1f}" for k, v in laps.items() if isinstance(v, float)),
              flush=True)
        del lm


if __name__ == "__main__":
    main()
