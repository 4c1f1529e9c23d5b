"""The paper's protocol timed on a GPU, with no network and no real weights (run by benchmarks/gpu_protocol.sh).

1. The paper's 1.3B shape built from a config on the GPU with random weights: OPT (the fairseq dense LM family the
   paper's GPT models come from), 24 layers, width 2048, 32 heads, FFN 8192, vocabulary 50,272; tokenised by iclgd's
   byte tokenizer over texts whose byte length is each SST-2 example's token count under a GPT-2-style BPE
   (benchmarks/sst2_token_lengths.json, measured with SmolLM2's tokenizer), so the prompts have SST-2's token
   lengths. Timing needs no trained weights: the FLOPs and memory traffic depend on the shapes only.
2. One compare unit (k = 32, n_test = 200, seed 1) in bf16 and fp32, with its phases; then the paper's protocol
   (six tasks, 3 seeds, 2,000 test examples each) extrapolated from them: per task one ZSL pass (shared by the
   seeds), per seed the ICL pass, FT, the ZSL pass after FT, the ΔW statistics and the metrics; the per-example
   phases scaled by 2000 / 200, the rest kept (this uses SST-2's lengths for every task: the other tasks' inputs are
   longer, so this is a lower bound, stated in the output).
3. Determinism: two compares of a tiny model on the GPU, results byte-identical (timings excluded); and
   ``--batch-size auto`` (the size it applied).

    python benchmarks/gpu_protocol.py [--part all|shape|determinism] [--dtypes bfloat16,float32] [--n-test 200]
                                      [--dry-run]   (on the CPU with a 2-layer shape: checks the script itself)
"""

import argparse
import filecmp
import json
import random
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
HERE = Path(__file__).resolve().parent

PROTOCOL = {"tasks": 6, "seeds": 3, "n_test": 2000}
PER_EXAMPLE = ("zsl", "icl", "ft_zsl", "metrics_similarities")  # phases that grow with the test set


def _data(root: Path, n_test: int) -> Path:
    """A task folder whose texts have SST-2's token lengths under the byte tokenizer (one byte, one token)."""
    lengths = json.loads((HERE / "sst2_token_lengths.json").read_text())
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    (root / "toy").mkdir(parents=True, exist_ok=True)
    for split, lens in (("train", lengths["train"]), ("dev", lengths["dev"][:n_test])):
        with open(root / "toy" / f"{split}.jsonl", "w") as f:
            for i, n in enumerate(lens):
                text = "".join(rng.choice(letters) for _ in range(max(1, n)))
                f.write(json.dumps({"text": text, "label": i % 2, "idx": i}) + "\n")
    return root


def _spec():
    from iclgd.core.tasks import TaskSpec

    # one byte per token; the lengths already count SST-2's template (make_sst2_token_lengths.py)
    return TaskSpec(name="sst2-lengths", template="{sentence}", label_words=("n", "p"),
                    fields={"sentence": "text"}, demo_file="toy/train.jsonl", eval_file="toy/dev.jsonl", lr=5e-4)


DEVICE = "cuda"
PAPER = dict(vocab_size=50272, hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32)
DRY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4)  # --dry-run
SHAPE = dict(PAPER)


def _paper_shape(dtype: str):
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    import iclgd
    from iclgd.core.models.tiny import byte_tokenizer

    cfg = OPTConfig(**SHAPE, max_position_embeddings=2048, word_embed_proj_dim=SHAPE["hidden_size"],
                    torch_dtype=dtype)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = OPTForCausalLM(cfg).to(getattr(torch, dtype))
    return iclgd.load_model(model, byte_tokenizer(), name=f"opt-1.3b-shape-random-{dtype}")


def shape(dtypes: list[str], n_test: int) -> None:
    import torch

    from iclgd.core.tasks import load_task
    from iclgd.experiments.compare import CompareConfig, compare_seed

    root = _data(Path(tempfile.mkdtemp(prefix="iclgd-gpu-")), n_test)
    data = load_task(_spec(), root, n_test=n_test)
    where = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "CPU (dry run)"
    print(f"{where}; torch {torch.__version__}; n_test {len(data.eval_rows)}, "
          f"demo pool {len(data.demo_pool)}", flush=True)
    for dtype in dtypes:
        lm = _paper_shape(dtype)
        n_params = sum(p.numel() for p in lm.model.parameters())
        cfg = CompareConfig(k=32, batch_size="auto")
        compare_seed(lm, load_task(_spec(), root, n_test=16), cfg, seed=2, progress=False)  # warm-up (kernels)
        gpu = DEVICE == "cuda"
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        result, _, laps = compare_seed(lm, data, cfg, seed=1, progress=False)
        if gpu:
            torch.cuda.synchronize()
        unit = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if gpu else float("nan")
        scale = PROTOCOL["n_test"] / len(data.eval_rows)
        per_ex = sum(laps[k] for k in PER_EXAMPLE if k in laps)
        fixed = sum(v for k, v in laps.items() if isinstance(v, float) and k not in PER_EXAMPLE)
        zsl = laps["zsl"] * scale  # once per task
        seed_unit = (per_ex - laps["zsl"]) * scale + fixed
        total = PROTOCOL["tasks"] * (zsl + PROTOCOL["seeds"] * seed_unit)
        print(f"\n{lm.name}: {n_params / 1e9:.2f} B parameters, {dtype}; compare unit k 32 (true {result['k_true']}), "
              f"n_test {result['n']}, batch size applied {lm.batch_limit or 'auto (64)'}: {unit:.1f} s, "
              f"peak GPU memory {peak:.1f} GiB")
        print("  phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in laps.items() if isinstance(v, float)))
        print(f"  the paper's protocol ({PROTOCOL['tasks']} tasks x {PROTOCOL['seeds']} seeds x "
              f"{PROTOCOL['n_test']} test examples), extrapolated: {total / 60:.1f} min on this GPU "
              f"(ZSL {zsl:.0f} s per task; {seed_unit:.0f} s per seed; SST-2's lengths for every task, so a lower "
              "bound for the longer tasks)", flush=True)
        del lm
        if gpu:
            torch.cuda.empty_cache()


def determinism() -> None:
    """Two GPU compares of a tiny model: their results files byte for byte (timings are in their own field)."""
    from iclgd.cli import app

    work = Path(tempfile.mkdtemp(prefix="iclgd-gpu-det-"))
    root = _data(work / "data", 40)
    spec = root / "spec.json"  # its data files are relative to the data directory beside it
    s = _spec()
    spec.write_text(json.dumps({"name": s.name, "template": s.template, "label_words": list(s.label_words),
                                "fields": dict(s.fields), "demo_file": s.demo_file, "eval_file": s.eval_file}))
    outs = []
    for run in ("a", "b"):
        out = work / run
        args = ["compare", "--model", "tiny-random-llama", "--task-spec", str(spec), "--data-dir", str(root),
                "--k", "4", "--n-test", "40", "--seeds", "1,2", "--device", DEVICE, "--batch-size", "auto",
                "--out", str(out)]
        try:
            code = app(args, standalone_mode=False)
        except SystemExit as e:
            code = e.code
        if code:
            sys.exit(f"determinism run {run}: exit {code}")
        outs.append(out)
    a, b = outs
    same, differ = [], []
    for f in sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file()):
        if f.name in ("timing.json",) or f.suffix in (".png", ".lock"):
            continue
        ja, jb = (json.loads((x / f).read_text()) if f.suffix == ".json" else None for x in (a, b))
        if ja is not None:  # timings and the run's own clock are kept apart in their own fields
            for d in (ja, jb):
                for key in ("timing", "_timing", "finished", "started"):
                    d.pop(key, None) if isinstance(d, dict) else None
            (same if ja == jb else differ).append(str(f))
        else:
            (same if filecmp.cmp(a / f, b / f, shallow=False) else differ).append(str(f))
    print(f"\ndeterminism on the GPU: {len(same)} files identical, {len(differ)} differ"
          + (f": {', '.join(differ)}" if differ else ""))
    res = json.loads(next(a.rglob("results.json")).read_text())
    print(f"  --batch-size auto applied: {json.dumps(res.get('config', {}).get('batch_size_applied'))}; "
          f"hardware {json.dumps(res.get('versions', {}).get('hardware'))}")
    shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("all", "shape", "determinism"), default="all")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--dry-run", action="store_true", help="on the CPU, a 2-layer shape of width 64: checks the script")
    args = ap.parse_args()
    import torch

    global DEVICE
    if args.dry_run:
        DEVICE = "cpu"
        SHAPE.update(DRY)
    elif not torch.cuda.is_available():
        sys.exit("gpu_protocol: no CUDA GPU on this machine (--dry-run checks the script on the CPU)")
    if args.part in ("all", "determinism"):
        determinism()
    if args.part in ("all", "shape"):
        shape(args.dtypes.split(","), args.n_test)


if __name__ == "__main__":
    main()
