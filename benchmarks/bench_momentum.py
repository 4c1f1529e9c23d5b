"""Momentum attention vs vanilla SDPA: forward+backward time of a GPT-2-small-shaped layer stack.

d_model 768, 12 heads, MLP 3072 (GPT-2 small's layer shape), --layers layers (default 4, to fit 2 CPU
cores; the ratio is per layer), batch 1, T = 256, 512, 1024. The two variants share the same weights and
are timed interleaved, median of --reps runs after one warm-up each, so machine noise hits both alike.
Goal: momentum / vanilla <= 1.10x.

    python benchmarks/bench_momentum.py [--layers 4] [--reps 3] [--lengths 256,512,1024]
"""

import argparse
import copy
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--lengths", default="256,512,1024")
    args = ap.parse_args()
    import transformers as T
    from transformers.utils import logging

    logging.set_verbosity_error()
    from iclgd.core.models import LoadedModel, adapter_for, byte_tokenizer
    from iclgd.engine.momentum import enable_momentum

    torch.manual_seed(0)
    cfg = T.GPT2Config(n_embd=768, n_head=12, n_layer=args.layers, n_positions=1024, vocab_size=512)
    cfg._attn_implementation = "sdpa"
    vanilla = T.GPT2LMHeadModel(cfg).train()
    mom = LoadedModel("bench", copy.deepcopy(vanilla), byte_tokenizer(), adapter_for("gpt2"), "bench")
    enable_momentum(mom, eta=0.9)
    models = {"vanilla": vanilla, "momentum": mom.model.train()}

    def step(model, ids):
        t = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    print(f"GPT-2-small-shaped stack: {args.layers} layers, d 768, 12 heads; torch threads {torch.get_num_threads()}")
    print(f"{'T':>6} {'vanilla s':>10} {'momentum s':>11} {'ratio':>7}")
    for T_ in [int(x) for x in args.lengths.split(",")]:
        ids = torch.randint(0, 512, (1, T_))
        times = {k: [] for k in models}
        for m in models.values():
            step(m, ids)  # warm-up
        for _ in range(args.reps):
            for k, m in models.items():
                times[k].append(step(m, ids))
        tv, tm = statistics.median(times["vanilla"]), statistics.median(times["momentum"])
        print(f"{T_:>6} {tv:>10.3f} {tm:>11.3f} {tm / tv:>6.3f}x")


if __name__ == "__main__":
    main()
