"""Training language models from scratch, with vanilla or momentum attention (nanoGPT-style loop).

One function, :func:`pretrain`: a byte-level BPE tokenizer trained on the corpus (``tokenizers``), a
Llama-style model from a plain config, AdamW with linear warm-up and cosine decay, gradient clipping,
validation perplexity in ``log.csv``, and safetensors checkpoints written atomically. An interrupted
run resumes from its last checkpoint and ends with the same weights and loss as an uninterrupted one:
the data order is a pure function of (seed, step), and initialisation of the seed alone.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from iclgd.core import options as O
from iclgd.core.errors import IclgdError
from iclgd.core.io import read_json

# ----------------------------------------------------------------------------- corpora

CORPORA = {  # name -> (train, valid, test) relative to <data>/corpora, or one file to split 90/5/5
    "tinyshakespeare": ("tinyshakespeare/input.txt",),
    "austen": ("austen/train.txt", "austen/valid.txt", "austen/test.txt"),
    "kjv": ("kjv/train.txt", "kjv/valid.txt", "kjv/test.txt"),
}
# wikitext-2 is not offered: its train split is missing from the data directory (see its README)


@dataclass
class Corpus:
    name: str
    train: str
    valid: str
    test: str
    files: dict[str, str] = field(default_factory=dict)  # path -> sha256


def _read(path: Path) -> str:
    if not path.is_file():
        raise IclgdError(f"--corpus: file {path} not found")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise IclgdError(f"--corpus {path}:{line}: not UTF-8 text (byte {e.start}); save the corpus as UTF-8") from None


def load_corpus(name: str, data_dir=None) -> Corpus:
    """A corpus name from :data:`CORPORA` (read from the data directory) or a path to a text file."""
    from iclgd.core.io import sha256_file
    from iclgd.core.tasks import resolve_data_dir

    p = Path(name)
    if name in CORPORA:
        ddir = resolve_data_dir(data_dir)
        if ddir is None:
            raise IclgdError(f"--corpus {name}: no data directory found (--data-dir, $ICLGD_DATA_DIR, ../shared/data)")
        paths = [ddir / "corpora" / rel for rel in CORPORA[name]]
    elif p.is_file():
        paths = [p]
    elif name.startswith("hf:"):
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise IclgdError("--corpus hf:...: the `datasets` package is not installed") from None
        from iclgd.core.tasks import hub_dataset

        ds = hub_dataset(f"--corpus {name}", name[3:])
        texts = ["\n".join(ds[s]["text"]) for s in ("train", "validation", "test")]
        return Corpus(name, *texts)
    else:
        raise IclgdError(f"--corpus {name!r}: unknown corpus (expected one of {', '.join(CORPORA)}, "
                         "a text file, or hf:DATASET)")
    texts = [_read(x) for x in paths]
    if not any(t.strip() for t in texts):
        raise IclgdError(f"--corpus {name}: the corpus is empty ({', '.join(map(str, paths))})")
    if len(texts) == 1:  # one file: first 90 % train, next 5 % valid, last 5 % test (cut at line breaks)
        t = texts[0]
        a, b = t.rfind("\n", 0, int(len(t) * 0.9)) + 1, t.rfind("\n", 0, int(len(t) * 0.95)) + 1
        if not (0 < a < b < len(t)):
            raise IclgdError(f"--corpus {name}: too short to split into train/valid/test")
        texts = [t[:a], t[a:b], t[b:]]
    return Corpus(name, *texts, files={str(x): sha256_file(x) for x in paths})


def train_tokenizer(text: str, vocab_size: int):
    """Byte-level BPE trained on ``text``, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<bos>", "<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.splitlines(keepends=True), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def encode(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


# ----------------------------------------------------------------------------- model and loop


@dataclass
class ModelSize:
    d_model: int
    n_layers: int
    n_heads: int
    d_mlp: int
    block_size: int
    vocab_size: int


SIZES = {
    "tiny": ModelSize(32, 2, 2, 64, 64, 300),  # tests: seconds
    "small": ModelSize(128, 4, 4, 512, 512, 2048),  # a few minutes on 2 CPU cores
}


@dataclass
class TrainConfig:
    """``iclgd pretrain``: a small Llama-style LM trained from scratch, with vanilla or momentum attention."""

    corpus: str = O.option("tinyshakespeare", "tinyshakespeare, austen, kjv, a text file, or hf:DATASET",
                           check=O.no_nul)
    attention: str = O.attention_field()
    eta: float = O.eta_field(help="momentum coefficient strictly between 0 and 1 (fixed, or the initial value with "
                                  "--learnable-eta)")
    learnable_eta: bool = O.learnable_eta_field()
    gate: bool = O.gate_field()
    size: str = O.option("small", "model size", choices=tuple(SIZES), old="--config")
    seed: int = O.option(1, "seed of the initialization and the data order", check=O.a_seed)
    steps: int = O.option(150, "optimizer steps (>= 1)", check=O.min_int(1))  # small: ≈ one epoch, ~5 min
    batch_size: int = O.option(4, "sequences per step", cli=False)
    lr: float = O.option(3e-3, "peak learning rate", cli=False)
    min_lr: float = O.option(3e-4, "final learning rate of the cosine schedule", cli=False)
    warmup: int = O.option(15, "linear warm-up steps", cli=False)
    weight_decay: float = O.option(0.1, "AdamW weight decay", cli=False)
    grad_clip: float = O.option(1.0, "gradient-norm clip", cli=False)
    eval_every: int = O.option(25, "steps between validation evaluations", cli=False)
    eval_tokens: int = O.option(32768, "validation tokens per evaluation", cli=False)
    ckpt_every: int = O.option(25, "steps between checkpoints", cli=False)

    def __post_init__(self):
        O.validate(self)
        O.gate_needs_eq9(self.attention, self.gate)

    def check(self) -> None:
        """Validated on construction; kept for callers that re-check after changing a field."""
        O.validate(self)


def build_model(cfg: TrainConfig, vocab_size: int):
    """A Llama-style model (RMSNorm, rotary, SwiGLU) from the size table; momentum attention if asked."""
    import transformers as T

    from iclgd.core.models import LoadedModel, adapter_for

    s = SIZES[cfg.size]
    mc = T.LlamaConfig(hidden_size=s.d_model, num_hidden_layers=s.n_layers, num_attention_heads=s.n_heads,
                       num_key_value_heads=s.n_heads, intermediate_size=s.d_mlp, max_position_embeddings=s.block_size,
                       vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=True)
    mc._attn_implementation = "sdpa"
    torch.manual_seed(cfg.seed)  # same seed -> same initial weights for vanilla and momentum
    model = T.LlamaForCausalLM(mc)
    lm = LoadedModel(f"{cfg.size}-{cfg.attention}", model, None, adapter_for("llama"), "built by iclgd.train")
    if cfg.attention in ("momentum", "ema"):
        from iclgd.engine.momentum import enable_momentum

        enable_momentum(lm, cfg.eta, cfg.learnable_eta, kind="ema" if cfg.attention == "ema" else "eq9",
                        gate=cfg.gate, seed=cfg.seed)
    return lm


def batch_at(data: torch.Tensor, step: int, seed: int, batch_size: int, block: int) -> torch.Tensor:
    """The batch of a step: a pure function of (seed, step), so runs are reproducible and resumable."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(data) - block - 1, (batch_size,), generator=g)
    return torch.stack([data[s: s + block + 1] for s in starts.tolist()])


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, frac)))


@torch.no_grad()
def perplexity(model, data: torch.Tensor, length: int, max_tokens: int | None = None, batch_size: int = 8) -> float:
    """exp(mean next-token loss) over non-overlapping windows of ``length`` tokens."""
    data = data[: max_tokens] if max_tokens else data
    n = (len(data) - 1) // length
    if n < 1:
        raise IclgdError(f"validation text has fewer than {length + 1} tokens")
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for b in range(0, n, batch_size):
        idx = range(b, min(n, b + batch_size))
        x = torch.stack([data[i * length: i * length + length] for i in idx])
        y = torch.stack([data[i * length + 1: i * length + length + 1] for i in idx])
        logits = model(input_ids=x).logits
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was)
    return math.exp(total / count)


def save_checkpoint(out: Path, model, opt, meta: dict, at: str = "ckpt") -> None:
    """``out/at`` (``ckpt``; a world folder keeps it under ``checkpoints/resume``): weights, optimizer state and
    ``meta`` (its step, ...), swapped in whole (a crash at any moment leaves the previous checkpoint or the new
    one)."""
    from safetensors.torch import save_model

    final = Path(out) / at
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    (tmp / "step.json").write_text(json.dumps(meta))
    old = final.parent / f".{final.name}.old"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def load_checkpoint(out: Path, model, opt, at: str = "ckpt") -> dict | None:
    """Restore ``out/at`` into ``model`` and ``opt``; its meta, or None when there is no checkpoint."""
    from safetensors.torch import load_model

    ck = Path(out) / at
    if not (ck / "step.json").is_file():
        return None
    try:
        meta = json.loads((ck / "step.json").read_text())
        load_model(model, str(ck / "model.safetensors"))
        opt.load_state_dict(torch.load(ck / "optimizer.pt", weights_only=True))
    except Exception as e:  # noqa: BLE001 - any damage to the checkpoint is the user's to know about
        raise IclgdError(f"{ck}: corrupted checkpoint ({type(e).__name__}); delete it to start over") from None
    return meta


LOG_FIELDS = ["step", "lr", "train_loss", "val_loss", "val_ppl"]


def _write_log(path: Path, rows: list[dict]) -> None:
    from iclgd.core.io import atomic_write_csv

    atomic_write_csv(path, rows, LOG_FIELDS)


def _tokenizer(out: Path, corpus: Corpus, vocab_size: int, tokenizer=None, save: bool = True):
    """The run's tokenizer: the one given, else the run folder's, else one trained on the corpus; saved
    to ``out/tokenizer.json`` if it is not there yet."""
    tok_path = out / "tokenizer.json"
    if tokenizer is None:
        if tok_path.is_file():
            from transformers import PreTrainedTokenizerFast

            tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tok_path), bos_token="<bos>", eos_token="<eos>",
                                                pad_token="<pad>")
        else:
            tokenizer = train_tokenizer(corpus.train, vocab_size)
    if save and not tok_path.is_file():
        from iclgd.core.io import atomic_write_text

        atomic_write_text(tok_path, tokenizer.backend_tokenizer.to_str())
    return tokenizer


def optimizer(model, cfg) -> torch.optim.AdamW:
    """AdamW, weight decay on matrices only (nanoGPT's split); ``cfg`` has ``lr`` and ``weight_decay``."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


def lm_batch_loss(model, cfg: TrainConfig, train_ids: torch.Tensor, step: int, block: int) -> torch.Tensor:
    """The next-token loss on the batch of ``step`` (a function of the seed and the step: resumable)."""
    xy = batch_at(train_ids, step, cfg.seed, cfg.batch_size, block)
    logits = model(input_ids=xy[:, :-1]).logits  # logits at t predict token t+1 = xy[:, 1:]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), xy[:, 1:].flatten())


def descend(model, opt, loss_t: torch.Tensor, grad_clip: float, step: int, what: str) -> float:
    """One optimizer step on ``loss_t`` with gradient clipping; a non-finite loss is refused in one line."""
    if not torch.isfinite(loss_t):
        raise IclgdError(f"{what}: loss became {loss_t.item()} at step {step}; lower --lr")
    opt.zero_grad(set_to_none=True)
    loss_t.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss_t.item()


def fit(model, opt, cfg, start: int, loss_at, after_step, desc: str, progress: bool = True,
        stop_after: int | None = None, what: str = "training") -> tuple[float, int | None]:
    """The one training loop, of LM pretraining (:func:`pretrain`) and of world models
    (:func:`iclgd.engine.world.train`): from step ``start`` to ``cfg.steps``, the scheduled learning rate (linear
    warm-up, then cosine to ``cfg.min_lr``: :func:`lr_at`, as a torch ``LambdaLR``), the step's loss
    (``loss_at(step)``), one clipped optimizer step (:func:`descend`), then ``after_step(step, loss)`` (the
    caller's logging, evaluation and checkpoints; a dict it returns goes to the progress bar).

    Returns (the last loss, the step it stopped at when ``stop_after`` steps of this call ended it early, else
    None). Resuming is the caller's checkpoint (:func:`load_checkpoint`) and ``start``: the schedule is a function
    of the step, so a resumed run takes the same rates as an uninterrupted one."""
    from iclgd.core.progress import bar as progress_bar

    for g in opt.param_groups:  # the schedule's base rate (a restored optimizer carries its last rate)
        g["lr"] = g["initial_lr"] = cfg.lr
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_at(cfg, start + i) / cfg.lr)
    bar = progress_bar(range(start, cfg.steps), desc=desc, enabled=bool(progress), initial=start, total=cfg.steps)
    loss = float("nan")
    for done, step in enumerate(bar, 1):
        loss = descend(model, opt, loss_at(step), cfg.grad_clip, step, what)
        sched.step()
        post = after_step(step, loss)
        if post:
            bar.set_postfix(**post)
        if stop_after is not None and done >= stop_after and step + 1 < cfg.steps:
            bar.close()
            return loss, step + 1
    bar.close()
    return loss, None


RUN_FILES = ("ckpt", ".ckpt.old", "tokenizer.json", "log.csv", "config.json", "final.json")


def check_run_folder(cfg: TrainConfig, out: Path, data_dir=None, overwrite: bool = False) -> None:
    """A run folder resumes only a run of the same configuration on the same corpus: otherwise its
    config.json and final.json would describe data the weights never saw. ``overwrite`` starts over."""
    from iclgd.core.runfolder import differing_keys

    out = Path(out)
    present = [n for n in RUN_FILES if (out / n).exists()]
    if not present:
        return
    differ = ["(no config.json)"]
    if (out / "config.json").is_file():
        try:
            old = json.loads((out / "config.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = None
        if not isinstance(old, dict):
            differ = ["(config.json is not a JSON object)"]
        else:
            differ = differing_keys(old, asdict(cfg))
    if not differ and (out / "final.json").is_file():
        try:
            final = read_json(out / "final.json")
        except (json.JSONDecodeError, UnicodeDecodeError):
            final = None
        files = final.get("data_sha256") if isinstance(final, dict) else None
        if files is None or files != load_corpus(cfg.corpus, data_dir).files:
            differ = ["corpus data (its files or their sha256)"]
    if not differ:
        return
    if not overwrite:
        raise IclgdError(f"--out {out}: holds a pretraining run of another configuration (differs in "
                         f"{', '.join(differ)}); use another --out, or --overwrite to start over")
    for n in present:
        (shutil.rmtree if (out / n).is_dir() else os.unlink)(out / n)


def pretrain(cfg: TrainConfig, out: Path, data_dir=None, progress: bool = True, stop_after: int | None = None,
             tokenizer=None, corpus: Corpus | None = None) -> dict:
    """Train (or resume) into ``out``; returns the summary also written to ``out/final.json``.

    ``stop_after`` ends the run early after that many steps of this call (to test interruption).
    A ``tokenizer`` trained elsewhere (same corpus) can be shared between runs.
    """
    from iclgd.core.io import atomic_write_json, ensure_dir
    from iclgd.core.models import run_versions

    cfg.check()
    check_run_folder(cfg, out, data_dir)  # never resume (or describe) a run of another configuration
    out = ensure_dir(out)
    corpus = corpus or load_corpus(cfg.corpus, data_dir)
    s = SIZES[cfg.size]
    tokenizer = _tokenizer(out, corpus, s.vocab_size, tokenizer, save=False)
    train_ids, val_ids = encode(tokenizer, corpus.train), encode(tokenizer, corpus.valid)
    for split, ids in (("train", train_ids), ("validation", val_ids)):  # checked before the run folder is written
        if len(ids) <= s.block_size + 1:
            raise IclgdError(f"--corpus {cfg.corpus}: its {split} split has {len(ids)} tokens, fewer than one block of "
                             f"{s.block_size + 1} (--config {cfg.size}); give a longer corpus")
    _tokenizer(out, corpus, s.vocab_size, tokenizer)
    lm = build_model(cfg, len(tokenizer))
    model = lm.model.train()
    opt = optimizer(model, cfg)
    start = int((load_checkpoint(out, model, opt) or {"step": 0})["step"])
    if start >= cfg.steps and (out / "final.json").is_file():  # finished: rewriting would record a NaN loss
        return read_json(out / "final.json")
    log_path = out / "log.csv"
    rows = []
    if start and log_path.is_file():
        with open(log_path) as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start]
    atomic_write_json(out / "config.json", asdict(cfg))
    def after_step(step: int, loss: float) -> dict | None:
        row = {"step": step + 1, "lr": f"{lr_at(cfg, step):.6g}", "train_loss": f"{loss:.6f}", "val_loss": "",
               "val_ppl": ""}
        post = None
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            ppl = perplexity(model, val_ids, s.block_size, cfg.eval_tokens)
            row.update(val_loss=f"{math.log(ppl):.6f}", val_ppl=f"{ppl:.4f}")
            post = {"val_ppl": f"{ppl:.2f}"}
        rows.append(row)
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(out, model, opt, {"step": step + 1})
            _write_log(log_path, rows)
        return post

    loss, stopped = fit(model, opt, cfg, start, lambda step: lm_batch_loss(model, cfg, train_ids, step, s.block_size),
                        after_step, f"{cfg.attention} seed {cfg.seed}", progress, stop_after)
    if stopped is not None:
        return {"stopped_at": stopped}
    _write_log(log_path, rows)
    summary = {"kind": "iclgd.pretrain", "config": asdict(cfg), "final_train_loss": loss,
               "n_params": sum(p.numel() for p in model.parameters()), "train_tokens": len(train_ids),
               "val_tokens": len(val_ids), "data_sha256": corpus.files, "versions": run_versions()}
    atomic_write_json(out / "final.json", summary)
    return summary


def load_trained(out: Path):
    """The trained model of a run folder (architecture rebuilt from its config) and its tokenizer."""
    from safetensors.torch import load_model
    from transformers import PreTrainedTokenizerFast

    cfg = TrainConfig(**json.loads((Path(out) / "config.json").read_text()))
    tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(out) / "tokenizer.json"), bos_token="<bos>",
                                  eos_token="<eos>", pad_token="<pad>")
    lm = build_model(cfg, len(tok))
    load_model(lm.model, str(Path(out) / "ckpt" / "model.safetensors"))
    lm.model.eval()
    lm.tokenizer = tok
    return lm, cfg, tok
