"""An ICL world: token-level few-shot classification, and small Hugging Face models trained on it here.

The world (Chan et al. 2022; Reddy 2024): many classes, each a fixed prototype of ``item_len`` item
tokens; an exemplar of a class is its prototype with every token but the last replaced, with
probability ``noise``, by a uniformly random item token. A training sequence draws ``n_labels`` classes,
assigns them the ``n_labels`` label words by a fresh random permutation (so only the context tells a
class's label: ZSL is at chance by construction) and lists ``n_pairs`` (exemplar, label) pairs whose
classes are drawn from those few (bursty). Evaluation tasks are fixed assignments (classes -> labels)
drawn from the world seed, and training rejects any sequence whose assignment equals one of them.

Token layout, exactly what the engine's prompts produce for a world task spec (template ``"{x}"``, answer
``" {label}"``, separator ``"\\n"``, which the word-level tokenizer splits away), tested in
tests/test_world.py:

    [BOS] x_1 ... x_L y_1  x_1 ... x_L y_2  ...            (x: item tokens, y: a label token)

so each label follows its item directly. The loss covers only label positions whose class appeared
earlier in the sequence (the first occurrence of a class cannot be predicted).

Files: ``iclgd world train --out DIR`` writes DIR/world.json (world config), DIR/model/ (an HF folder:
Llama config, safetensors, a ``tokenizers`` word-level tokenizer as PreTrainedTokenizerFast),
DIR/checkpoints/step-N/ (HF folders), DIR/checkpoints/resume/ (resume state), DIR/log.csv; ``iclgd world tasks DIR``
writes DIR/tasks/*.json and DIR/data/<task>/{demo,eval}.jsonl.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from iclgd.core.errors import IclgdError
from iclgd.core.options import ATTENTIONS, gate_needs_eq9  # vanilla, Eq. 9 momentum, the authors' EMA

SPECIALS = ["<bos>", "<eos>", "<pad>", "<unk>"]
BOS = 0


# ----------------------------------------------------------------------------- configs


@dataclass
class WorldConfig:
    """The data distribution. Everything (prototypes, evaluation tasks) is a function of ``seed``."""

    seed: int = 0
    n_items: int = 128  # item vocabulary ("w000" ...)
    n_classes: int = 32  # classes, each a prototype of item_len item tokens; last tokens all distinct
    item_len: int = 2  # tokens per exemplar (>= 2: a real query segment for SimAM/Kendall)
    noise: float = 0.9  # probability that a prototype token (all but the last) is replaced by a random item
    n_labels: int = 4  # label words "L0" ... per sequence and per task
    n_pairs: int = 8  # (exemplar, label) pairs per training sequence
    n_eval_tasks: int = 8  # ZSL of one task is decided by a few classes: several tasks average that out
    n_demo_rows: int = 256  # per evaluation task: the demonstration pool ...
    n_eval_rows: int = 400  # ... and the evaluation split (balanced over classes)

    def check(self) -> None:
        if self.item_len < 1 or self.n_labels < 2 or self.n_pairs < 2:
            raise IclgdError("world: expected item_len >= 1, n_labels >= 2, n_pairs >= 2")
        if self.n_classes < self.n_labels or self.n_classes > self.n_items:
            raise IclgdError(f"world: n_classes {self.n_classes} must lie in [n_labels, n_items]")
        if not 0.0 <= self.noise < 1.0:
            raise IclgdError(f"world: noise {self.noise} must lie in [0, 1)")

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + self.n_labels + self.n_items

    @property
    def label_ids(self) -> np.ndarray:
        return np.arange(len(SPECIALS), len(SPECIALS) + self.n_labels)

    @property
    def item_offset(self) -> int:
        return len(SPECIALS) + self.n_labels

    @property
    def seq_len(self) -> int:  # [BOS] + pairs
        return 1 + self.n_pairs * (self.item_len + 1)


@dataclass
class ModelConfig:
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_mlp: int = 128
    max_positions: int = 512
    init_std: float = 0.02  # initializer_range of the Llama config (transformers' default 0.02)
    attention_bias: bool = False  # biases on q/k/v/o: a content-free positional pattern (previous token) is easy




@dataclass
class WorldTrainConfig:
    world: WorldConfig = field(default_factory=WorldConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: str = "vanilla"  # or "momentum" (Eq. 9) or "ema" (the authors' code variant)
    eta: float = 0.9
    learnable_eta: bool = False
    gate: bool = False  # Eq. 9 times a learnable per-head gate initialised at 0
    seed: int = 1  # initialisation and data order (the same for vanilla and momentum)
    steps: int = 5000
    batch_size: int = 32
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 200
    copy_steps: int = 200  # the first N steps train in-context copying of random tokens (an induction warm-up),
    copy_every: int = 4  # ... and after them every N-th step (0: never); see README for why
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_n: int = 512  # held-out sequences per evaluation (on the evaluation tasks' assignments)
    ckpt_every: int = 500  # resume state and an HF checkpoint folder every N steps
    threads: int = 1  # measured: 2 threads on 2 shared cores were 3-4x slower per step than 1

    def check(self) -> None:
        self.world.check()
        if self.attention not in ATTENTIONS:
            raise IclgdError(f"--attention {self.attention!r}: expected one of {', '.join(ATTENTIONS)}")
        gate_needs_eq9(self.attention, self.gate)
        if self.attention == "momentum":
            from iclgd.engine.momentum import check_eta

            check_eta(self.eta)
        if self.steps < 1:
            raise IclgdError(f"--steps {self.steps}: expected at least 1")
        if self.world.seq_len > self.model.max_positions:
            raise IclgdError(f"world: sequences of {self.world.seq_len} tokens exceed max_positions")

    @staticmethod
    def from_dict(d: dict) -> "WorldTrainConfig":
        d = dict(d)
        return WorldTrainConfig(world=WorldConfig(**d.pop("world")), model=ModelConfig(**d.pop("model")), **d)


# Sizes: "tiny" for tests (seconds), "demo" for make demo (<= 3 min), "default" for the ICL >= 0.9 goal,
# "deep" (4 layers) for the metrics along training.
SIZES: dict[str, dict] = {
    "tiny": dict(world=dict(n_items=64, n_classes=16, n_pairs=8, n_demo_rows=64, n_eval_rows=64),
                 model=dict(d_model=64, n_layers=2, n_heads=2, d_mlp=128), steps=600, batch_size=32, warmup=50,
                 copy_steps=100, eval_every=100, eval_n=256, ckpt_every=100),
    "demo": dict(steps=1500, eval_every=100, ckpt_every=250),  # make demo and the world preset: ~2 min a run
    "default": dict(steps=5000),  # the ICL >= 0.9 goal
    # 4 layers, so that layer 0 (which K/V finetuning cannot reach through its queries) is a quarter of the
    # answer, not half: the metrics-along-training study (studies/along_training.py)
    "deep": dict(model=dict(n_layers=4), steps=8000, ckpt_every=500),
    # the same with 4-word items: a longer query segment (SimAM over 5 query positions instead of 3)
    "deep-long": dict(world=dict(item_len=4), model=dict(n_layers=4), steps=8000, ckpt_every=500),
}


def sized(size: str, world_seed: int | None = None, **over) -> WorldTrainConfig:
    """The training configuration of a size, with ``over`` replacing its fields. ``seed`` is the training seed
    (initialisation and data order, :attr:`WorldTrainConfig.seed`), ``world_seed`` the world's
    (:attr:`WorldConfig.seed`); the world's other fields may be given by name. (Before 0.2 ``seed`` went to the
    world: every "seed" of a world experiment shared one initialisation and one batch order.)"""
    if size not in SIZES:
        raise IclgdError(f"--size {size!r}: expected one of {', '.join(SIZES)}")
    s = {k: dict(v) if isinstance(v, dict) else v for k, v in SIZES[size].items()}
    w, m = WorldConfig(**s.pop("world", {})), ModelConfig(**s.pop("model", {}))
    if world_seed is not None:
        w.seed = world_seed
    for k in list(over):
        if k in WorldConfig.__dataclass_fields__ and k != "seed":
            setattr(w, k, over.pop(k))
    return WorldTrainConfig(world=w, model=m, **{**s, **over})


# ----------------------------------------------------------------------------- the world


class World:
    """Prototypes and evaluation tasks of a :class:`WorldConfig`, and the sequence generator."""

    def __init__(self, cfg: WorldConfig):
        cfg.check()
        self.cfg = c = cfg
        rng = np.random.default_rng([c.seed, 101])
        # prototypes: (n_classes, item_len) item indices; the last tokens are distinct across classes
        last = rng.choice(c.n_items, c.n_classes, replace=False)
        rest = rng.integers(0, c.n_items, (c.n_classes, c.item_len - 1))
        self.prototypes = np.concatenate([rest, last[:, None]], axis=1)
        # evaluation tasks: fixed assignments (task, class j) -> label j, classes drawn from the world
        self.task_classes = np.stack([rng.choice(c.n_classes, c.n_labels, replace=False)
                                      for _ in range(c.n_eval_tasks)])  # (tasks, n_labels): class of label j
        self._held = {self._key(tc, np.arange(c.n_labels)) for tc in self.task_classes}

    @staticmethod
    def _key(classes: np.ndarray, labels: np.ndarray) -> frozenset:
        return frozenset(zip(classes.tolist(), labels.tolist()))

    def tokens(self) -> list[str]:
        c = self.cfg
        return SPECIALS + [f"L{j}" for j in range(c.n_labels)] + [f"w{i:03d}" for i in range(c.n_items)]

    def exemplars(self, classes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Noisy exemplars of ``classes`` (any shape S) as token ids, shape S + (item_len,)."""
        c = self.cfg
        items = self.prototypes[classes].copy()
        noisy = rng.random(items[..., :-1].shape) < c.noise
        items[..., :-1] = np.where(noisy, rng.integers(0, c.n_items, items[..., :-1].shape), items[..., :-1])
        return items + c.item_offset

    def sequences(self, n: int, rng: np.random.Generator, tasks: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
        """``n`` sequences (n, seq_len) and their loss mask (n, seq_len): True at label tokens whose class
        appeared earlier. ``tasks``: (n,) evaluation-task indices to use their fixed assignments; else each
        sequence gets fresh classes and a fresh label permutation (never an evaluation task's)."""
        c = self.cfg
        ilen, P = c.item_len, c.n_pairs
        L = c.n_labels
        if tasks is None:
            cls = np.argsort(rng.random((n, c.n_classes)), axis=1)[:, :L]  # (n, L) distinct classes
            lab = np.argsort(rng.random((n, L)), axis=1)  # (n, L) label of each drawn class
            for i in range(n):  # reject an evaluation task's assignment (redraw the permutation)
                while self._key(cls[i], lab[i]) in self._held:
                    lab[i] = rng.permutation(L)
        else:
            cls = self.task_classes[tasks]
            lab = np.tile(np.arange(L), (n, 1))
        slot = rng.integers(0, L, (n, P))  # (n, P) which drawn class each pair shows: bursty
        pair_cls = np.take_along_axis(cls, slot, 1)
        pair_lab = np.take_along_axis(lab, slot, 1)
        items = self.exemplars(pair_cls, rng)  # (n, P, ilen)
        pairs = np.concatenate([items, (pair_lab + len(SPECIALS))[..., None]], axis=2)  # (n, P, ilen+1)
        seq = np.concatenate([np.full((n, 1), BOS), pairs.reshape(n, -1)], axis=1)
        seen = np.zeros((n, P), dtype=bool)
        for j in range(1, P):
            seen[:, j] = (slot[:, :j] == slot[:, j: j + 1]).any(1)
        mask = np.zeros_like(seq, dtype=bool)
        mask[:, 1 + ilen:: ilen + 1] = seen  # label positions
        return seq, mask

    def copy_sequences(self, n: int, rng: np.random.Generator, length: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
        """The warm-up task: ``[BOS] r_1 ... r_m r_1 ... r_m`` with random item tokens r, loss on the second
        copy (in-context copying, which only an induction circuit solves). Shape (n, length or seq_len)."""
        c = self.cfg
        T = length or c.seq_len
        m = (T - 1 + 1) // 2
        r = rng.integers(len(SPECIALS), c.vocab_size, (n, m))  # items and label words
        seq = np.concatenate([np.full((n, 1), BOS), r, r], axis=1)[:, :T]
        mask = np.zeros_like(seq, dtype=bool)
        mask[:, 1 + m:] = True
        return seq, mask

    # ------------------------------------------------------------------ files

    def tokenizer(self):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {t: i for i, t in enumerate(self.tokens())}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                       pad_token="<pad>", unk_token="<unk>")

    def row(self, item_ids: np.ndarray, label: int, idx: int) -> dict:
        toks = self.tokens()
        return {"x": " ".join(toks[t] for t in item_ids), "label": int(label), "idx": idx}

    def task_rows(self, t: int, n: int, stream: int) -> list[dict]:
        """``n`` exemplars of task ``t``, balanced over its classes (shuffled), with the task's labels."""
        c = self.cfg
        rng = np.random.default_rng([c.seed, 202, t, stream])
        labels = rng.permutation(np.arange(n) % c.n_labels)
        items = self.exemplars(self.task_classes[t][labels], rng)
        return [self.row(items[i], labels[i], i) for i in range(n)]

    def task_names(self) -> list[str]:
        return [f"world-{t}" for t in range(self.cfg.n_eval_tasks)]

    def write_tasks(self, out: Path) -> list[Path]:
        """DIR/tasks/world-T.json (task specs) and DIR/data/world-T/{demo,eval}.jsonl."""
        from iclgd.core.io import atomic_write_json, atomic_write_jsonl

        out = Path(out)
        specs = []
        for t, name in enumerate(self.task_names()):
            atomic_write_jsonl(out / "data" / name / "demo.jsonl", self.task_rows(t, self.cfg.n_demo_rows, 0))
            atomic_write_jsonl(out / "data" / name / "eval.jsonl", self.task_rows(t, self.cfg.n_eval_rows, 1))
            spec = {"name": name, "template": "{x}", "answer_format": " {label}",
                    "label_words": [f"L{j}" for j in range(self.cfg.n_labels)], "fields": {"x": "x"},
                    "demo_file": f"../data/{name}/demo.jsonl", "eval_file": f"../data/{name}/eval.jsonl",
                    "eval_cap": self.cfg.n_eval_rows, "demo_overlap": "keep",  # few items: inputs repeat by design
                    "_world": {"classes": self.task_classes[t].tolist(),
                               "prototypes": self.prototypes[self.task_classes[t]].tolist(),
                               "note": "label j is class classes[j]; an assignment never used in training"}}
            p = out / "tasks" / f"{name}.json"
            atomic_write_json(p, spec)
            specs.append(p)
        return specs


# ----------------------------------------------------------------------------- model


def build_model(cfg: WorldTrainConfig):
    """A Llama-style LM (RMSNorm, rotary, SwiGLU, tied embeddings) as a LoadedModel; momentum if asked.
    Initial weights depend on ``cfg.seed`` alone (momentum's learnable η is added after them)."""
    import transformers as T

    from iclgd.core.models import LoadedModel, adapter_for

    m, w = cfg.model, cfg.world
    mc = T.LlamaConfig(hidden_size=m.d_model, num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
                       num_key_value_heads=m.n_heads, intermediate_size=m.d_mlp, max_position_embeddings=m.max_positions,
                       vocab_size=w.vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                       tie_word_embeddings=True, initializer_range=m.init_std, attention_bias=m.attention_bias)
    mc._attn_implementation = "sdpa"
    mc.iclgd_trained_len = w.seq_len  # saved in config.json: scoring warns on prompts longer than this
    torch.manual_seed(cfg.seed)
    model = T.AutoModelForCausalLM.from_config(mc)
    lm = LoadedModel(f"world-{cfg.attention}", model, World(w).tokenizer(), adapter_for(mc.model_type),
                     "built by iclgd.world")
    if cfg.attention in ("momentum", "ema"):
        from iclgd.engine.momentum import enable_momentum

        enable_momentum(lm, cfg.eta, cfg.learnable_eta, kind="ema" if cfg.attention == "ema" else "eq9",
                        gate=cfg.gate, seed=cfg.seed)
    return lm


def save_hf(lm, folder: Path) -> None:
    """An ordinary HF folder (config, safetensors, tokenizer), written to a temp folder then renamed."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    lm.model.save_pretrained(tmp)
    lm.tokenizer.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


# ----------------------------------------------------------------------------- training


def batch_at(world: World, step: int, seed: int, batch_size: int, copy: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of a step, a pure function of (seed, step): runs are reproducible and resumable."""
    rng = np.random.default_rng([seed, 303, step])
    if copy:
        seq, mask = world.copy_sequences(batch_size, rng)
    else:
        seq, mask = world.sequences(batch_size, rng)
    return torch.from_numpy(seq), torch.from_numpy(mask)


def is_copy_step(cfg: WorldTrainConfig, step: int) -> bool:
    return step < cfg.copy_steps or (cfg.copy_every > 0 and step % cfg.copy_every == 0)


def masked_loss(model, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy at the masked label positions.  seq, mask: (B, T)."""
    logits = model(input_ids=seq[:, :-1]).logits  # (B, T-1, V): position t predicts token t+1
    m = mask[:, 1:]
    return torch.nn.functional.cross_entropy(logits[m].float(), seq[:, 1:][m])


@torch.no_grad()
def evaluate_proxy(lm, world: World, n: int, seed: int = 12345) -> dict:
    """ICL and ZSL accuracy on the evaluation tasks' fixed assignments, the way the engine predicts
    (argmax over the label words' log-probs): ICL = the last label of a sequence of n_pairs pairs whose
    class appeared earlier; ZSL = ``[BOS] x`` alone. Also the masked loss on those sequences."""
    c = world.cfg
    rng = np.random.default_rng([c.seed, 404, seed])
    tasks = rng.integers(0, c.n_eval_tasks, n * 2)
    seq, mask = world.sequences(n * 2, rng, tasks)
    keep = np.flatnonzero(mask[:, -1])[:n]  # queries whose class is in the context
    seq, mask, tasks = seq[keep], mask[keep], tasks[keep]
    model = lm.model
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    x = torch.from_numpy(seq).to(dev)
    logits = model(input_ids=x[:, :-1]).logits.float()
    lab = torch.from_numpy(world.cfg.label_ids).to(dev)
    icl_pred = logits[:, -1, lab].argmax(-1)
    target = x[:, -1] - len(SPECIALS)
    m = torch.from_numpy(mask).to(dev)[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[m], x[:, 1:][m]).item()
    zsl_in = torch.cat([x[:, :1], x[:, -1 - c.item_len: -1]], dim=1)  # [BOS] query item
    zsl_pred = model(input_ids=zsl_in).logits[:, -1, lab].argmax(-1)
    model.train(was)
    return {"icl_acc": float((icl_pred == target).float().mean()), "zsl_acc": float((zsl_pred == target).float().mean()),
            "eval_loss": loss, "n": int(len(keep))}


@torch.no_grad()
def zsl_null(lm, world: World, n_assign: int = 64, n_per: int = 256, seed: int = 0) -> dict:
    """ZSL accuracy (``[BOS] x`` alone) on the fixed evaluation tasks beside its null: the same on ``n_assign``
    random label assignments drawn as the world draws tasks (classes and a label permutation). A ZSL mean over the
    fixed tasks reads as knowledge only where it lies outside what means over as many random tasks give."""
    c = world.cfg
    rng = np.random.default_rng([c.seed, 505, seed])
    model = lm.model
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    lab = torch.from_numpy(c.label_ids).to(dev)

    def acc(classes: np.ndarray, labels: np.ndarray) -> float:  # classes[j] carries label labels[j]
        slot = rng.integers(0, c.n_labels, n_per)
        items = world.exemplars(classes[slot], rng)  # (n_per, item_len)
        x = torch.from_numpy(np.concatenate([np.full((n_per, 1), BOS), items], axis=1)).to(dev)
        pred = model(input_ids=x).logits[:, -1, lab].argmax(-1).cpu().numpy()
        return float((pred == labels[slot]).mean())

    fixed = [acc(world.task_classes[t], np.arange(c.n_labels)) for t in range(c.n_eval_tasks)]
    null = np.array([acc(rng.choice(c.n_classes, c.n_labels, replace=False), rng.permutation(c.n_labels))
                     for _ in range(n_assign)])
    # means over as many random tasks as there are fixed ones, resampled from the null draws
    sets = rng.choice(null, (10_000, len(fixed))).mean(1)
    # ICL on fresh assignments (each sequence its own classes and label permutation, never an evaluation task's)
    seq, mask = world.sequences(n_per * 2, rng)
    keep = np.flatnonzero(mask[:, -1])[:n_per]
    x = torch.from_numpy(seq[keep]).to(dev)
    icl_pred = model(input_ids=x[:, :-1]).logits[:, -1, lab].argmax(-1)
    icl_random = float((icl_pred == x[:, -1] - len(SPECIALS)).float().mean())
    model.train(was)
    return {"fixed_per_task": fixed, "fixed_mean": float(np.mean(fixed)), "null_mean": float(null.mean()),
            "null_sd": float(null.std(ddof=1)), "null_set_mean_sd": float(sets.std(ddof=1)),
            "p_null_set_mean_at_least_fixed": float((sets >= np.mean(fixed)).mean()), "n_assign": n_assign,
            "icl_random_assignments": icl_random, "n_icl_random": int(len(keep)),
            "n_per_task": n_per, "chance": 1 / c.n_labels}


LOG_FIELDS = ["step", "wall_s", "lr", "train_loss", "eval_loss", "icl_acc", "zsl_acc"]


def _write_log(path: Path, rows: list[dict]) -> None:
    from iclgd.core.io import atomic_write_csv

    atomic_write_csv(path, rows, LOG_FIELDS)


def read_log(out: Path) -> list[dict]:
    with open(Path(out) / "log.csv") as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in r.items()} for r in csv.DictReader(f)]


def train(cfg: WorldTrainConfig, out, progress: bool = True, stop_after: int | None = None,
          device: str = "cpu") -> dict:
    """Train (or resume) a world model into ``out`` on ``device`` (``auto``: CUDA, then MPS, else the CPU);
    returns the summary written to ``out/final.json``, which records the device applied.

    ``stop_after`` ends this call after that many steps (to test resumption). The task files are written
    too, so ``out`` is a complete world: model/, tasks/, data/.
    """
    from iclgd.core.io import atomic_write_json, ensure_dir
    from iclgd.core.models import resolve_device, run_versions
    from iclgd.core.schema import read_config
    from iclgd.engine.train import fit, load_checkpoint, lr_at, optimizer, save_checkpoint

    cfg.check()
    device = resolve_device(device)
    out = ensure_dir(out)
    cfg_doc = asdict(cfg)
    old_cfg = out / "train_config.json"
    if old_cfg.is_file() and read_config(old_cfg, WorldTrainConfig, "world training configuration") != cfg:
        from iclgd.core.runfolder import differing_keys

        differ = differing_keys(json.loads(old_cfg.read_text()), cfg_doc)
        raise IclgdError(f"{old_cfg}: a world run of another configuration (differs in {', '.join(differ)}); use "
                         "another --out, or --overwrite to start over")
    atomic_write_json(old_cfg, cfg_doc)
    atomic_write_json(out / "world.json", asdict(cfg.world))
    torch.set_num_threads(cfg.threads)
    world = World(cfg.world)
    world.write_tasks(out)
    lm = build_model(cfg)
    model = lm.model.to(device).train()
    opt = optimizer(model, cfg)
    legacy = (out / "ckpt").is_dir() and not (out / RESUME).is_dir()  # a folder written before 0.3
    meta = load_checkpoint(out, model, opt, "ckpt" if legacy else RESUME) or {"step": 0, "wall_s": 0.0}
    start, wall0 = int(meta["step"]), float(meta["wall_s"])
    rows = [r for r in csv.DictReader(open(out / "log.csv"))] if start and (out / "log.csv").is_file() else []
    rows = [r for r in rows if int(r["step"]) <= start]
    if start == 0:
        ev = evaluate_proxy(lm, world, cfg.eval_n)
        rows = [{"step": 0, "wall_s": 0.0, "lr": 0.0, "train_loss": "", "eval_loss": f"{ev['eval_loss']:.5f}",
                 "icl_acc": f"{ev['icl_acc']:.4f}", "zsl_acc": f"{ev['zsl_acc']:.4f}"}]
        save_hf(lm, out / "checkpoints" / "step-000000")
    t0 = time.perf_counter() - wall0  # wall time counts training and evaluation, not checkpoint writing

    def loss_at(step: int) -> torch.Tensor:
        seq, mask = batch_at(world, step, cfg.seed, cfg.batch_size, is_copy_step(cfg, step))  # (B, T), (B, T)
        return masked_loss(model, seq.to(device), mask.to(device))

    def after_step(step: int, loss: float) -> dict | None:
        nonlocal t0
        post = None
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            ev = evaluate_proxy(lm, world, cfg.eval_n)
            rows.append({"step": step + 1, "wall_s": round(time.perf_counter() - t0, 2), "lr": f"{lr_at(cfg, step):.6g}",
                         "train_loss": f"{loss:.5f}", "eval_loss": f"{ev['eval_loss']:.5f}",
                         "icl_acc": f"{ev['icl_acc']:.4f}", "zsl_acc": f"{ev['zsl_acc']:.4f}"})
            post = {"icl": f"{ev['icl_acc']:.3f}", "zsl": f"{ev['zsl_acc']:.3f}", "loss": f"{loss:.3f}"}
            _write_log(out / "log.csv", rows)  # rows past the last checkpoint are dropped on resume
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps:
            t_pause = time.perf_counter()
            save_hf(lm, out / "checkpoints" / f"step-{step + 1:06d}")
            save_checkpoint(out, model, opt, {"step": step + 1, "wall_s": t_pause - t0}, RESUME)
            if (out / "ckpt").is_dir():  # a folder of before 0.3: one layout from now on
                shutil.rmtree(out / "ckpt")
            _write_log(out / "log.csv", rows)
            t0 += time.perf_counter() - t_pause
        return post

    _, stopped = fit(model, opt, cfg, start, loss_at, after_step, f"world {cfg.attention} seed {cfg.seed}", progress,
                     stop_after, "world training")
    if stopped is not None:
        return {"stopped_at": stopped}
    _write_log(out / "log.csv", rows)
    save_hf(lm, out / "model")
    last = rows[-1]
    summary = {"kind": "iclgd.world.train", "config": cfg_doc, "final": {k: float(last[k]) for k in LOG_FIELDS[1:]
                                                                          if last[k] not in ("", None)},
               "zsl_null": zsl_null(lm, world),
               "n_params": sum(p.numel() for p in model.parameters()), "versions": run_versions(),
               "threads": cfg.threads, "device": device, "steps_per_s": round(cfg.steps / max(1e-9, float(last["wall_s"])), 2)}
    atomic_write_json(out / "final.json", summary)
    return summary


RESUME = "checkpoints/resume"  # the resume state (weights, optimizer, step) beside the HF snapshots step-N


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    return sorted((int(p.name.split("-")[1]), p) for p in (Path(out) / "checkpoints").glob("step-*") if p.is_dir())


def write_world_tasks(out, world_seed: int = 0) -> list[Path]:
    """``iclgd world tasks``: the evaluation tasks of the world in ``out/world.json`` (written with ``world_seed``
    when the folder has none)."""
    from iclgd.core.io import atomic_write_json, ensure_dir
    from iclgd.core.schema import read_config

    out = ensure_dir(out)
    wf = out / "world.json"
    if wf.is_file():
        cfg = read_config(wf, WorldConfig, "world configuration")
    else:
        cfg = WorldConfig(seed=world_seed)
        atomic_write_json(wf, asdict(cfg))
    return World(cfg).write_tasks(out)
