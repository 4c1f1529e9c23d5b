"""Vanilla vs momentum attention, trained from the same seed, data order and initialisation; and the
zero-training probe of adding the EMA to a pretrained model. Reports whatever comes out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from iclgd.core import metrics as M
from iclgd.core.errors import IclgdError
from iclgd.core.io import atomic_write_json


@torch.no_grad()
def copy_accuracy(model, vocab_size: int, n_seq: int = 64, length: int = 32, seed: int = 0,
                  special: int = 3) -> float:
    """In-context copying (an induction probe): a random token segment shown twice; accuracy of the
    next-token argmax over the second copy, which only the context can predict."""
    g = torch.Generator().manual_seed(seed)
    seg = torch.randint(special, vocab_size, (n_seq, length), generator=g)
    x = torch.cat([seg, seg], dim=1)
    logits = model(input_ids=x[:, :-1]).logits
    pred = logits[:, length - 1: 2 * length - 1].argmax(-1)
    return float((pred == seg).float().mean())


@dataclass
class MomentumConfig:
    """``iclgd momentum compare``: vanilla and momentum LMs trained from the same seeds, data order and init."""

    corpus: str = "tinyshakespeare"
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    eta: float = 0.9
    size: str = "small"
    steps: int = 150
    lengths: tuple[int, ...] = (128, 256, 512)  # perplexity windows
    learnable_eta: bool = False
    data_dir: Path | None = None
    train: dict = field(default_factory=dict)  # any other TrainConfig field, e.g. eval_every


def run(cfg: MomentumConfig, out: Path, progress: bool = True) -> dict:
    """Train vanilla and momentum for each seed (resumable runs under out/<variant>-s<seed>), then compare."""
    from iclgd.core.io import ensure_dir
    from iclgd.core.models import run_versions
    from iclgd.engine.momentum import check_eta
    from iclgd.engine.train import (
        SIZES,
        TrainConfig,
        encode,
        load_corpus,
        load_trained,
        perplexity,
        pretrain,
        train_tokenizer,
    )

    corpus, seeds, eta, size, steps, lengths = cfg.corpus, cfg.seeds, cfg.eta, cfg.size, cfg.steps, cfg.lengths
    learnable_eta, data_dir, train_kw = cfg.learnable_eta, cfg.data_dir, cfg.train
    check_eta(eta)
    if not seeds:
        raise IclgdError("--seeds: expected a comma list of integers")
    out = ensure_dir(out)
    s = SIZES[size] if size in SIZES else None
    if s is None:
        raise IclgdError(f"--config {size!r}: expected one of {', '.join(SIZES)}")
    bad = [L for L in lengths if L > s.block_size]
    if bad:
        raise IclgdError(f"--lengths: {bad} exceed the model's context of {s.block_size} tokens")
    corp = load_corpus(corpus, data_dir)
    tok_file = out / "tokenizer.json"
    if tok_file.is_file():
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_file), bos_token="<bos>", eos_token="<eos>",
                                      pad_token="<pad>")
    else:
        tok = train_tokenizer(corp.train, s.vocab_size)  # one tokenizer for every run: comparable perplexities
        tok.backend_tokenizer.save(str(tok_file))
    test_ids = encode(tok, corp.test)
    runs = {}
    for seed in seeds:
        for variant in ("vanilla", "momentum"):
            cfg = TrainConfig(corpus=corpus, attention=variant, eta=eta, learnable_eta=learnable_eta, size=size,
                              seed=seed, steps=steps, **train_kw)
            d = out / f"{variant}-s{seed}"
            if not (d / "final.json").is_file():
                pretrain(cfg, d, data_dir, progress=progress, tokenizer=tok, corpus=corp)
            lm, _, _ = load_trained(d)
            runs[(variant, seed)] = {
                "ppl": {str(L): perplexity(lm.model, test_ids, L) for L in lengths},
                "copy_acc": copy_accuracy(lm.model, len(tok), seed=seed),
                "eta_learned": ([torch.sigmoid(lm.attention(l).momentum_theta).tolist() for l in range(lm.n_layers)]
                                if variant == "momentum" and learnable_eta else None),
            }
    summary = {}
    for key in [f"ppl@{L}" for L in lengths] + ["copy_acc"]:
        get = (lambda r, L=key[4:]: r["ppl"][L]) if key.startswith("ppl") else (lambda r: r["copy_acc"])
        van = [get(runs[("vanilla", sd)]) for sd in seeds]
        mom = [get(runs[("momentum", sd)]) for sd in seeds]
        diff = [m - v for m, v in zip(mom, van)]
        summary[key] = {"vanilla": M.bootstrap_ci(van), "momentum": M.bootstrap_ci(mom),
                        "paired_diff_momentum_minus_vanilla": M.bootstrap_ci(diff)}
    doc = {"kind": "iclgd.momentum.compare",
           "config": {"corpus": corpus, "seeds": seeds, "eta": eta, "learnable_eta": learnable_eta, "size": size,
                      "steps": steps, "lengths": list(lengths), "test_tokens": len(test_ids), **train_kw},
           "data_sha256": corp.files, "versions": run_versions(),
           "runs": {f"{v}-s{sd}": r for (v, sd), r in runs.items()}, "summary": summary,
           "note": "perplexity on the corpus' test split, non-overlapping windows of each length; copy_acc: "
                   "in-context copying of a random 32-token segment (chance ~ 1/vocab)"}
    return doc


def write(doc: dict, out) -> Path:
    path = Path(out) / "results.json"
    atomic_write_json(path, doc)
    return path


def apply_pretrained(model: str, eta: float, corpus: str = "austen", tasks: str = "sst2", n_test: int = 50, k: int = 8,
                     max_tokens: int = 16384, lengths=(128, 256, 512), data_dir=None, out=None) -> dict:
    """The EMA added to a pretrained model without training: perplexity and ICL accuracy, vanilla vs momentum."""
    from iclgd.core.models import run_versions
    from iclgd.core.models import load_model
    from iclgd.core.tasks import load_tasks
    from iclgd.engine.momentum import check_eta, enable_momentum
    from iclgd.engine.scoring import EvalConfig, evaluate
    from iclgd.engine.train import encode, load_corpus, perplexity

    check_eta(eta)
    corp = load_corpus(corpus, data_dir)
    datas, _ = load_tasks(tasks, None, data_dir, n_test)
    names = [d.spec.name for d in datas]
    res = {}
    for variant in ("vanilla", "momentum"):
        lm = load_model(model)
        if variant == "momentum":
            enable_momentum(lm, eta)
        ids = encode(lm.tokenizer, corp.test)[:max_tokens]
        res[variant] = {"ppl": {str(L): perplexity(lm.model, ids, L) for L in lengths},
                        "icl": {d.spec.name: evaluate(lm, d, EvalConfig(k=k), progress=True)["acc_icl"] for d in datas}}
    doc = {"kind": "iclgd.momentum.apply", "config": {"model": model, "eta": eta, "corpus": corpus, "tasks": names,
                                                       "n_test": n_test, "k": k, "max_tokens": max_tokens},
           "data_sha256": corp.files, "versions": run_versions(), "results": res}
    if out is not None:
        atomic_write_json(Path(out) / "momentum_apply.json", doc)
    return doc
