"""What the metrics' captures cost: each scoring pass of a compare unit with its captures and without, interleaved in
one process, best of ``--repeat`` (this machine's run-to-run noise, ±10-20%, is larger than the difference a single
pair of runs would show).

    python benchmarks/bench_captures.py [--model smollm2-135m] [--task sst2] [--n-test 200] [--k 32] [--repeat 3]

The passes are those of ``bench_roofline.unit_passes`` (as ``compare_seed`` runs them and keeps their captures): ZSL
and ICL. Printed per pass: the best time without and with captures, their difference and ratio, and the captures'
own work timed inside the captured pass (the observer's calls, ``Observer.set_prefix`` and ``Observer.take_batch``:
best of ``--repeat``), which the noise of whole passes does not swamp. To compare two versions, run the same file
against each one's sources (``PYTHONPATH=<worktree>/src``).
"""

import argparse
import time
import warnings

from bench_roofline import unit_passes  # this folder is on the path when a benchmark runs as a script

warnings.filterwarnings("ignore")

PASSES = {"ZSL": ("ZSL scoring", "ZSL captured"), "ICL": ("ICL pass", "ICL captured")}  # plain, captured


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from transformers.utils import logging

    logging.set_verbosity_error()
    import iclgd
    from iclgd.core.models import load_model
    from iclgd.core.tasks import TASKS, load_task, resolve_data_dir
    from iclgd.engine.capture import Observer
    from iclgd.experiments.compare import CompareConfig

    inside = {"s": 0.0}  # seconds spent in the observer's calls during the current pass

    def timed(method):
        def run(*a, **kw):
            t0 = time.perf_counter()
            try:
                return method(*a, **kw)
            finally:
                inside["s"] += time.perf_counter() - t0
        return run

    Observer.set_prefix, Observer.take_batch = timed(Observer.set_prefix), timed(Observer.take_batch)
    lm = load_model(args.model)
    data = load_task(TASKS[args.task], resolve_data_dir(None), n_test=args.n_test)
    runs, *_ = unit_passes(lm, data, CompareConfig(k=args.k))
    runs["ZSL scoring"]()  # warm-up: the process's first pass faults the weights in
    best = {name: float("inf") for pair in PASSES.values() for name in pair}
    work = {p: float("inf") for p in PASSES}
    for _ in range(args.repeat):
        for p, pair in PASSES.items():
            for name in pair:
                inside["s"] = 0.0
                t0 = time.perf_counter()
                runs[name]()
                best[name] = min(best[name], time.perf_counter() - t0)
            work[p] = min(work[p], inside["s"])  # the captured pass ran last
    print(f"iclgd from {iclgd.__file__}; {args.model} {args.task} n_test {args.n_test}, best of {args.repeat}")
    for p, (plain, captured) in PASSES.items():
        a, b = best[plain], best[captured]
        print(f"  {p}: plain {a:.2f} s, with captures {b:.2f} s: +{b - a:.2f} s, {b / a:.3f}x; the captures' own work "
              f"inside the pass {work[p]:.2f} s")


if __name__ == "__main__":
    main()
