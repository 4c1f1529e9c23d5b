"""How a compare unit scales with the test set: peak host memory, seconds per example, capture and metrics overhead.

    python benchmarks/bench_scale.py [--model smollm2-135m] [--task sst2] [--sizes 50,100,200,400] [--k 32]

Each size runs in a fresh process (so its peak RSS is its own): one compare unit (seed 1), then the same
three scoring passes without captures (ZSL, ICL, ZSL on the finetuned weights; plain `score_options`). Printed
per size: peak RSS, seconds per test example, the unit's time over those three forward passes, the three
captured passes over the same passes without captures (the capture overhead), and the metrics' share of the
unit. Then the goals of issue 17: RSS growth from the second size to the last (< 5%), capture overhead
(<= 1.3), metrics share (<= 5%).

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
    phases["metrics"] = phases["metrics_kendall"] + phases["metrics_similarities"]  # every metric, with its baselines
    return {"iclgd": getattr(iclgd, "__file__", "?"), "n": result["n"], "unit_s": unit, "phases_s": phases,
            "forwards_s": t_plain, "captured_passes_s": captured, "rss_loaded_mb": rss_loaded, "rss_peak_mb": rss_peak}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--sizes", default="50,100,200,400")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one size in this process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.model, args.task, args.one, args.k)))
        return
    rows = []
    for n in [int(x) for x in args.sizes.split(",")]:
        res = subprocess.run([sys.executable, __file__, "--model", args.model, "--task", args.task, "--k", str(args.k),
                              "--one", str(n)], capture_output=True, text=True, env=os.environ)
        if res.returncode != 0:
            sys.exit(res.stderr[-2000:])
        r = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"n_test {r['n']:4d}: peak RSS {r['rss_peak_mb']:7.0f} MB (after load {r['rss_loaded_mb']:.0f}); "
              f"{r['unit_s'] / r['n']:.3f} s/example; unit / its 3 forward passes {r['unit_s'] / r['forwards_s']:.2f}; "
              f"captured passes / plain passes {r['captured_passes_s'] / r['forwards_s']:.3f}; "
              f"metrics {100 * r['phases_s']['metrics'] / r['unit_s']:.1f}% of the unit; "
              f"phases {json.dumps({k: round(v, 1) for k, v in r['phases_s'].items()})}", flush=True)
    a, b = rows[min(1, len(rows) - 1)], rows[-1]
    print(f"\n{args.model} {args.task} (iclgd from {rows[0]['iclgd']}):")
    print(f"  peak RSS growth n_test {a['n']} -> {b['n']}: {100 * (b['rss_peak_mb'] / a['rss_peak_mb'] - 1):+.1f}% "
          "(goal < 5%)")
    print(f"  capture overhead at n_test {b['n']}: {b['captured_passes_s'] / b['forwards_s']:.3f}x the plain passes "
          f"(goal <= 1.3); whole unit {b['unit_s'] / b['forwards_s']:.2f}x (it also finetunes and compares ΔW)")
    print(f"  metrics at n_test {b['n']}: {100 * b['phases_s']['metrics'] / b['unit_s']:.1f}% of the unit (goal <= 5%)")


if __name__ == "__main__":
    main()
