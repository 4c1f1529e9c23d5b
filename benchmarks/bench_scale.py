"""How a compare unit scales with the test set: peak host memory, seconds per example, capture and metrics overhead.

    python benchmarks/bench_scale.py [--model smollm2-135m] [--task sst2] [--sizes 100,200,400,872] [--k 32]
                                     [--malloc iclgd|glibc|env] [--repeat 1]

Each size runs in a fresh process (so its peak RSS is its own): a first forward pass over 8 ZSL prompts (untimed in
the unit: a process's first pass faults its weights in, once per process), one compare unit (seed 1), then the same
three scoring passes without captures (ZSL, ICL, ZSL on the finetuned weights; plain `score_options`). Printed
per size: peak RSS, seconds per test example, the unit's time over those three forward passes, the three
captured passes over the same passes without captures (the capture overhead), and the metrics' share of the
unit. Then the goals of issue 17: RSS growth from the second size to the last (< 5%), the unit's time over its
three forward passes without captures (<= 1.3), metrics share (<= 5%).

Host memory, in the environment users run in (nothing set). iclgd fixes glibc's mmap threshold at 1 MiB itself when
it loads a model (``mallopt``, src/iclgd/core/allocator.py; ``--malloc iclgd``, the default). ``--malloc glibc``
measures glibc's own dynamic threshold (``ICLGD_MALLOC=default``): it rises to the size of the largest buffer freed
so far, later multi-MB buffers then come from the heap and, freed and allocated again, fragment it, and the peak moves
by hundreds of MB from run to run. ``--malloc env`` sets ``MALLOC_MMAP_THRESHOLD_`` at process start instead.
``--repeat r`` runs each size r times and reports the median. An iclgd from before the allocator was set (measured
side by side, below) ignores ICLGD_MALLOC: its ``glibc`` and ``iclgd`` runs are both glibc's default.

To measure an earlier version side by side, run the same file against its sources:
    git worktree add /tmp/before <commit> && PYTHONPATH=/tmp/before/src python benchmarks/bench_scale.py ...
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings

warnings.filterwarnings("ignore")


def one(model: str, task: str, n: int, k: int) -> dict:
    """One size, in this process: the compare unit, then its three passes without captures."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    import iclgd
    from iclgd.core.models import load_model
    from iclgd.core.tasks import TASKS, load_task, resolve_data_dir, sample_demos
    from iclgd.engine.finetune import Snapshot, finetune
    from iclgd.engine.scoring import build_prompts, score_options
    from iclgd.experiments.compare import CompareConfig, compare_seed

    lm = load_model(model)
    data = load_task(TASKS[task], resolve_data_dir(None), n_test=n)
    cfg = CompareConfig(k=k)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # one forward pass first (a batch of ZSL prompts): the process's first pass faults the freshly loaded weights in
    # and starts the thread pools, a cost a process pays once (a sweep once for all its units), not the unit; timed
    # cold, the unit's first phase carried it and the plain passes, run after the unit, did not
    warm = build_prompts(lm, data.spec, [], data.eval_rows[:8], cfg.separator, cfg.max_len)
    t0 = time.perf_counter()
    score_options(lm, warm, cfg.batch_size)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result, _, phases = compare_seed(lm, data, cfg, seed=1, progress=False)
    unit = time.perf_counter() - t0
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # the same three scoring passes, without captures
    demos = sample_demos(data.demo_pool, cfg.k, 1, cfg.balanced, len(data.spec.label_words))
    icl = build_prompts(lm, data.spec, demos, data.eval_rows, cfg.separator, cfg.max_len)
    zsl = build_prompts(lm, data.spec, [], data.eval_rows, cfg.separator, cfg.max_len)
    t0 = time.perf_counter()
    score_options(lm, zsl, cfg.batch_size)
    score_options(lm, icl, cfg.batch_size)
    t_plain2 = time.perf_counter() - t0
    snap = Snapshot(lm, cfg.ft_params)
    finetune(lm, [icl.prefix_ids[a:b] for a, b in icl.demo_spans], result["lr"], cfg.ft_params, cfg.ft_mode)
    t0 = time.perf_counter()
    score_options(lm, zsl, cfg.batch_size)
    t_plain = t_plain2 + time.perf_counter() - t0
    snap.restore()
    captured = phases["zsl"] + phases["icl"] + phases["ft_zsl"]
    if "metrics" not in phases:  # every metric with its baselines (before issue 17 one lap, without SimAOU/SimAM)
        phases["metrics"] = phases["metrics_kendall"] + phases["metrics_similarities"]
    return {"iclgd": getattr(iclgd, "__file__", "?"), "n": result["n"], "unit_s": unit, "phases_s": phases,
            "forwards_s": t_plain, "captured_passes_s": captured, "warm_up_s": warm_s, "rss_loaded_mb": rss_loaded,
            "rss_peak_mb": rss_peak}


def _median(runs: list[dict]) -> dict:
    """Each number of several runs of one size: its median (the phases too); the rest from the first run."""
    import statistics

    out = dict(runs[0])
    for key, v in runs[0].items():
        if isinstance(v, float):
            out[key] = statistics.median(r[key] for r in runs)
    out["phases_s"] = {k: statistics.median(r["phases_s"][k] for r in runs) for k in runs[0]["phases_s"]}
    out["rss_runs_mb"] = [round(r["rss_peak_mb"]) for r in runs]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--sizes", default="100,200,400,872")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--malloc", choices=("iclgd", "glibc", "env"), default="iclgd",
                    help="iclgd: what iclgd sets itself (mmap threshold 1 MiB); glibc: glibc's dynamic threshold "
                         "(ICLGD_MALLOC=default); env: MALLOC_MMAP_THRESHOLD_ at process start")
    ap.add_argument("--repeat", type=int, default=1, help="runs per size (the median of each figure is printed)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one size in this process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.model, args.task, args.one, args.k)))
        return
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env.pop("ICLGD_MALLOC", None)
    if args.malloc == "env":
        env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)  # read by glibc at process start; a fixed threshold
    elif args.malloc == "glibc":
        env["ICLGD_MALLOC"] = "default"
    rows = []
    for n in [int(x) for x in args.sizes.split(",")]:
        runs = []
        for _ in range(args.repeat):
            res = subprocess.run([sys.executable, __file__, "--model", args.model, "--task", args.task, "--k",
                                  str(args.k), "--malloc", args.malloc, "--one", str(n)], capture_output=True,
                                 text=True, env=env)
            if res.returncode != 0:
                sys.exit(res.stderr[-2000:])
            runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
        r = _median(runs)
        rows.append(r)
        print(f"n_test {r['n']:4d}: peak RSS {r['rss_peak_mb']:7.0f} MB (runs {r['rss_runs_mb']}, after load "
              f"{r['rss_loaded_mb']:.0f}); "
              f"{r['unit_s'] / r['n']:.3f} s/example; unit / its 3 forward passes {r['unit_s'] / r['forwards_s']:.2f}; "
              f"captured passes / plain passes {r['captured_passes_s'] / r['forwards_s']:.3f}; "
              f"metrics {100 * r['phases_s']['metrics'] / r['unit_s']:.1f}% of the unit; "
              f"first pass of 8 prompts before the unit {r.get('warm_up_s', float('nan')):.1f} s; "
              f"phases {json.dumps({k: round(v, 1) for k, v in r['phases_s'].items()})}", flush=True)
    a, b = rows[min(1, len(rows) - 1)], rows[-1]
    print(f"\n{args.model} {args.task} (iclgd from {rows[0]['iclgd']}; malloc {args.malloc}; "
          f"median of {args.repeat} run(s) per size):")
    print(f"  peak RSS growth n_test {a['n']} -> {b['n']}: {100 * (b['rss_peak_mb'] / a['rss_peak_mb'] - 1):+.1f}% "
          "(goal < 5%)")
    print(f"  compare unit at n_test {b['n']}: {b['unit_s'] / b['forwards_s']:.2f}x its three forward passes without "
          f"captures (goal <= 1.3; the unit also finetunes, compares ΔW and computes the metrics); the three passes "
          f"with captures alone: {b['captured_passes_s'] / b['forwards_s']:.3f}x")
    print(f"  metrics at n_test {b['n']}: {100 * b['phases_s']['metrics'] / b['unit_s']:.1f}% of the unit (goal <= 5%)")


if __name__ == "__main__":
    main()
