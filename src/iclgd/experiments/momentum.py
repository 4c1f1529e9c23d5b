"""Vanilla vs momentum attention, trained from the same seed, data order and initialisation; and the
zero-training probe of adding the EMA to a pretrained model. Reports whatever comes out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from iclgd.core import metrics as M
from iclgd.core import options as O
from iclgd.core.errors import IclgdError
from iclgd.core.io import atomic_write_json
from iclgd.experiments.protocol import Experiment, Result, UnitKind, tidy_rows, writing


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


def _train_sizes() -> tuple[str, ...]:
    from iclgd.engine.train import SIZES

    return tuple(SIZES)


VARIANTS = O.ATTENTIONS  # each variant is an attention of iclgd.engine.train.TrainConfig


def _variants(flag: str, value) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if isinstance(value, str) else tuple(value)


def _vanilla_first(flag: str, value) -> None:
    bad = [v for v in value if v not in VARIANTS]
    if bad:
        raise IclgdError(f"{flag} {','.join(value)}: {bad[0]!r} is not one of {', '.join(VARIANTS)}")
    if not value or value[0] != "vanilla" or len(value) < 2 or len(set(value)) != len(value):
        raise IclgdError(f"{flag} {','.join(value)}: expected vanilla first, then one or more other distinct variants "
                         "(each is compared with vanilla, paired by seed)")


_WITH_MOMENTUM = ("variants", lambda v: "momentum" in v, "--variants with momentum")


@dataclass
class MomentumConfig:
    """``iclgd momentum compare``: vanilla and momentum LMs trained from the same seeds, data order and init."""

    corpus: str = O.option("tinyshakespeare", "tinyshakespeare, austen, kjv, a text file, or hf:DATASET",
                           check=O.no_nul)
    seeds: list[int] = O.seeds_field((1, 2, 3), "one seed or a comma list of distinct seeds (one vanilla and one "
                                                "momentum run each)")
    eta: float = O.eta_field(applies=_WITH_MOMENTUM)
    learnable_eta: bool = O.learnable_eta_field(applies=_WITH_MOMENTUM)
    size: str = O.option("small", "model size", choices=_train_sizes(), old="--config")
    steps: int = O.option(150, "optimizer steps per run (>= 1)", check=O.min_int(1))
    variants: tuple[str, ...] = O.option(help="the attention variants trained per seed, vanilla first: vanilla, "
                                              "momentum (Eq. 9, --eta), ema (the authors' code variant)",
                                         factory=lambda: ("vanilla", "momentum"), parse=_variants, check=_vanilla_first,
                                         type=str)
    lengths: tuple[int, ...] = O.option(help="comma list of distinct context lengths for perplexity",
                                        factory=lambda: (128, 256, 512), parse=O.int_tuple,
                                        check=O.each_at_least(2), type=str)  # perplexity windows
    data_dir: Path | None = O.data_dir_field("data directory holding the corpora")
    train: dict = field(default_factory=dict)  # any other TrainConfig field, e.g. eval_every

    def __post_init__(self):
        O.validate(self)

    def identity(self) -> dict:
        """What a results folder of this study must match to be resumed."""
        return {"corpus": self.corpus, "seeds": list(self.seeds), "eta": self.eta, "learnable_eta": self.learnable_eta,
                "size": self.size, "steps": self.steps, "lengths": list(self.lengths), "variants": list(self.variants)}


@dataclass
class ApplyConfig:
    """``iclgd momentum apply``: the EMA added to a pretrained model without training."""

    model: str = O.model_field()
    eta: float = O.eta_field()
    corpus: str = O.option("austen", "corpus of the perplexity: tinyshakespeare, austen, kjv or a file",
                           check=O.no_nul)
    task: str = O.tasks_field("all")
    n_test: int = O.n_test_field(50, "test examples per task (>= 1)")
    k: int = O.k_field(8, 0, "demonstrations per prompt (>= 0)")
    data_dir: Path | None = O.data_dir_field()

    def __post_init__(self):
        O.validate(self)


def run(cfg: MomentumConfig, out: Path, progress: bool = True) -> dict:
    """Train vanilla and momentum for each seed (resumable runs under out/<variant>-s<seed>), then compare."""
    from iclgd.core.io import ensure_dir
    from iclgd.core.models import run_versions
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
    s = SIZES[size]
    bad = [L for L in lengths if L > s.block_size]
    if bad:
        raise IclgdError(f"--lengths: {bad} exceed the model's context of {s.block_size} tokens")
    out = ensure_dir(out)
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
    variants = list(cfg.variants)
    for seed in seeds:
        for variant in variants:
            cfg = TrainConfig(corpus=corpus, attention=variant, **({"eta": eta} if variant == "momentum" else {}),
                              learnable_eta=learnable_eta and variant ==
                              "momentum", size=size, seed=seed, steps=steps, **train_kw)
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
        summary[key] = {v: M.bootstrap_ci([get(runs[(v, sd)]) for sd in seeds]) for v in variants}
        for v in variants[1:]:  # each variant against vanilla, paired by seed (same init and data order)
            summary[key][f"paired_diff_{v}_minus_vanilla"] = M.bootstrap_ci(
                [get(runs[(v, sd)]) - a for sd, a in zip(seeds, van)])
    doc = {"kind": "iclgd.momentum.compare",
           "config": {"corpus": corpus, "seeds": seeds, "eta": eta, "learnable_eta": learnable_eta, "size": size,
                      "steps": steps, "lengths": list(lengths), "variants": variants, "test_tokens": len(test_ids),
                      **train_kw},
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


class MomentumResult(Result):
    """``iclgd momentum compare``'s results.json: per seed and variant the perplexities and the copying probe;
    the summary with paired differences (momentum − vanilla)."""

    kind = "iclgd.momentum.compare"

    def rows(self) -> list[dict]:
        doc = next(iter(self.docs.values()))
        out = []
        for name, r in doc["runs"].items():
            variant, seed = name.rsplit("-s", 1)
            base = {"task": doc["config"]["corpus"], "seed": int(seed), "condition": variant}
            out += tidy_rows({"ppl": r["ppl"], "copy_acc": r["copy_acc"]}, base)
        return out


class ApplyResult(Result):
    """``iclgd momentum apply``'s momentum_apply.json: perplexity and ICL accuracy, vanilla vs the EMA added."""

    kind = "iclgd.momentum.apply"
    doc_name = "momentum_apply.json"

    def rows(self) -> list[dict]:
        doc = next(iter(self.docs.values()))
        return [row for v, r in doc["results"].items()
                for row in tidy_rows(r, {"task": doc["config"]["corpus"], "seed": None, "condition": v})]


def run_job(cfg: MomentumConfig, out, overwrite: bool = False, progress: bool = True) -> MomentumResult:
    """The study in ``out`` (resumable); a folder holding the results of another configuration is refused before
    any training, unless ``overwrite``."""
    from iclgd.experiments.protocol import writing

    out = Path(out)
    with writing(out, "momentum compare", cfg.identity(), overwrite, resumable=True):
        doc = run(cfg, out, progress=progress)
        write(doc, out)
    return MomentumResult({"results.json": doc})


def apply_job(cfg: ApplyConfig, out=None, overwrite: bool = False, progress: bool = True) -> ApplyResult:
    with writing(out, "momentum apply", cfg, overwrite):
        doc = apply_pretrained(cfg.model, cfg.eta, cfg.corpus, cfg.task, cfg.n_test, cfg.k, data_dir=cfg.data_dir,
                               out=out)
    return ApplyResult({"momentum_apply.json": doc})


# ----------------------------------------------------------------------------- as sweep units (iclgd reproduce)

def momentum_unit(p: dict, models, data_dir, progress: bool) -> dict:
    cfg = MomentumConfig(corpus=p["corpus"], seeds=list(p["seeds"]), eta=p["eta"], steps=p["steps"],
                                  data_dir=data_dir)
    doc = run(cfg, models.out / "momentum", progress)
    write(doc, models.out / "momentum")
    return {k: doc[k] for k in ("config", "summary", "runs")}


UNITS = (UnitKind("momentum", momentum_unit, cost=lambda p: 1e8),)


EXPERIMENTS = (Experiment("momentum compare", MomentumConfig, run_job, MomentumResult, UNITS),
               Experiment("momentum apply", ApplyConfig, apply_job, ApplyResult))
