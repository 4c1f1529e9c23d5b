"""What the metrics' captures cost: each scoring pass of a compare unit with its captures and without, interleaved in
one process, best of ``--repeat`` (this machine's run-to-run noise, ±10-20%, is larger than the difference a single
pair of runs would show).

    python benchmarks/bench_captures.py [--model smollm2-135m] [--task sst2] [--n-test 200] [--k 32] [--repeat 3]

Printed per pass (ZSL: the unit's keys and values of the first 100 examples kept; ICL: queries, demonstration scores
and the prefix's keys and values kept, as compare_seed keeps them): the best time without and with captures, their
difference and ratio. To compare two versions, run the same file against each one's sources
(``PYTHONPATH=<worktree>/src``).
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
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from transformers.utils import logging

    logging.set_verbosity_error()
    import iclgd
    from iclgd.core.models import load_model
    from iclgd.core.tasks import TASKS, load_task, resolve_data_dir, sample_demos
    from iclgd.engine.scoring import build_prompts, score_options
    from iclgd.experiments import compare as C

    lm = load_model(args.model)
    data = load_task(TASKS[args.task], resolve_data_dir(None), n_test=args.n_test)
    cfg = C.CompareConfig(k=args.k)
    demos = sample_demos(data.demo_pool, cfg.k, 1, cfg.balanced, len(data.spec.label_words))
    icl = build_prompts(lm, data.spec, demos, data.eval_rows, cfg.separator, cfg.max_len)
    zsl = build_prompts(lm, data.spec, [], data.eval_rows, cfg.separator, cfg.max_len)
    demo_pos = [i for a, b in icl.demo_spans for i in range(a, b)]
    n_upd, nk = min(cfg.updates_n, len(data.eval_rows)), min(cfg.kendall_n, len(data.eval_rows))
    bs = cfg.batch_size
    runs = {
        "ZSL": (lambda: score_options(lm, zsl, bs), lambda: C._observed(lm, zsl, cfg, [], False, keep_kv=n_upd)),
        "ICL": (lambda: score_options(lm, icl, bs),
                lambda: C._observed(lm, icl, cfg, demo_pos, False, keep_q=n_upd, keep_demo=nk,
                                    keep_prefix_kv=n_upd > 0)),
    }
    score_options(lm, zsl, bs)  # warm-up: the process's first pass faults the weights in
    best = {(p, w): float("inf") for p in runs for w in (0, 1)}
    for _ in range(args.repeat):
        for p, fns in runs.items():
            for w, fn in enumerate(fns):
                t0 = time.perf_counter()
                fn()
                best[p, w] = min(best[p, w], time.perf_counter() - t0)
    print(f"iclgd from {iclgd.__file__}; {args.model} {args.task} n_test {args.n_test}, best of {args.repeat}")
    for p in runs:
        plain, cap = best[p, 0], best[p, 1]
        print(f"  {p}: plain {plain:.2f} s, with captures {cap:.2f} s: +{cap - plain:.2f} s, {cap / plain:.3f}x")


if __name__ == "__main__":
    main()
