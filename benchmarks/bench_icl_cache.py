"""Prefix-KV reuse vs plain re-encoding for ICL scoring, measured side by side in one run.

SmolLM2-135M, SST-2, k=32 demonstrations. Reuse is timed over N_REUSE test examples including the
one-off prefix encoding (what a real evaluation pays); re-encoding over the first N_REENCODE of them
(its per-example cost does not depend on N). Prints examples/s of each, their ratio, and the largest
difference in option log-probabilities on the examples both scored (must be <= 1e-4).

    python benchmarks/bench_icl_cache.py [--n-reuse 200] [--n-reencode 16]
"""

import argparse
import time
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-reuse", type=int, default=200)
    ap.add_argument("--n-reencode", type=int, default=16)
    ap.add_argument("--k", type=int, default=32)
    args = ap.parse_args()
    from transformers.utils import logging

    logging.set_verbosity_error()
    from iclgd.core.models import load_model
    from iclgd.engine.scoring import build_prompts, score_options
    from iclgd.core.tasks import TASKS, load_task, resolve_data_dir, sample_demos

    lm = load_model(args.model)
    data = load_task(TASKS["sst2"], resolve_data_dir(None), n_test=args.n_reuse)
    p = build_prompts(lm, TASKS["sst2"], sample_demos(data.demo_pool, args.k, 1), data.eval_rows)
    sub = list(range(args.n_reencode))
    t = time.perf_counter()
    reuse = score_options(lm, p, reuse_prefix=True, progress="reuse")
    t_reuse = time.perf_counter() - t
    t = time.perf_counter()
    plain = score_options(lm, p, reuse_prefix=False, example_ids=sub, progress="re-encode")
    t_plain = time.perf_counter() - t
    eps_reuse, eps_plain = len(data.eval_rows) / t_reuse, len(sub) / t_plain
    print(f"model {args.model}, torch threads {torch.get_num_threads()}, k_true {p.k_true}, "
          f"prefix {len(p.prefix_ids)} tokens")
    print(f"reuse:     {eps_reuse:8.2f} examples/s  ({len(data.eval_rows)} examples, prefix encoding included)")
    print(f"re-encode: {eps_plain:8.2f} examples/s  ({len(sub)} examples)")
    print(f"ratio reuse/re-encode: {eps_reuse / eps_plain:.1f}x   (goal >= 8)")
    print(f"max |dlogprob| on the shared examples: {np.abs(reuse[sub] - plain[sub]).max():.2e}   (must be <= 1e-4)")


if __name__ == "__main__":
    main()
