"""Wall time of one `iclgd compare` unit on SmolLM2 (SST-2, 200 test examples, k=32) and each phase's share.

    python benchmarks/bench_compare.py [--task sst2] [--n-test 200] [--k 32]

Phases: ZSL, ICL (both with captures), FT (k SGD steps, recording training-token q/k), FT-ZSL, metrics.
The goal for the six tasks together is <= 30 min on 2 cores; the last line extrapolates from this task
only (other tasks' prompts are longer or shorter), so run it with --task for each to check.
"""

import argparse
import time
import warnings

warnings.filterwarnings("ignore")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--k", type=int, default=32)
    args = ap.parse_args()
    from transformers.utils import logging

    logging.set_verbosity_error()
    from iclgd.experiments.compare import CompareConfig, compare_seed
    from iclgd.core.models import load_model
    from iclgd.core.tasks import TASKS, load_task, resolve_data_dir

    t0 = time.perf_counter()
    lm = load_model(args.model)
    t_load = time.perf_counter() - t0
    data = load_task(TASKS[args.task], resolve_data_dir(None), n_test=args.n_test)
    t0 = time.perf_counter()
    result, _, phases = compare_seed(lm, data, CompareConfig(k=args.k), seed=1, progress=False)
    total = time.perf_counter() - t0
    print(f"{args.model} {args.task} n={args.n_test} k_true={result['k_true']}: compare unit {total:.1f} s "
          f"(model load {t_load:.1f} s, not included)")
    for k, v in phases.items():
        print(f"  {k:10s} {v:7.1f} s  {100 * v / total:5.1f} %")
    print(f"  six tasks at this rate: {6 * total / 60:.1f} min (goal <= 30 min)")


if __name__ == "__main__":
    main()
