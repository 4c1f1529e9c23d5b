"""Prompt building and option scoring: the ZSL / ICL evaluation engine.

A prompt is ``[BOS] demo_1 SEP demo_2 SEP ... demo_k SEP query``; each option is scored by the mean
log-probability of its label tokens after the prompt, and the prediction is the argmax (as in the
paper's code). The demonstration prefix ``[BOS] demo_1 SEP ... demo_k SEP`` is the same for every test
example of a (task, seed), so it is encoded once and its KV cache reused; ZSL is the same engine with
the prefix ``[BOS]``.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from iclgd.core import options as O
from iclgd.core.errors import IclgdError
from iclgd.core.hooks import Recorder
from iclgd.core.models import LoadedModel, native_gqa
from iclgd.core.progress import bar as progress_bar
from iclgd.core.tasks import TaskData, TaskSpec, sample_demos
from iclgd.engine.capture import Observer

log = logging.getLogger(__name__)

ONE_CLASS = 0.95  # a condition that answers one class for this share of the examples is flagged


def one_class_warnings(pred_counts: dict, where: str, labels) -> list[str]:
    """A warning for each condition (``{"zsl": counts, "icl": counts, ...}``) whose predictions are one class for at
    least 95% of the examples: its accuracy is then that class's share, not a measure of the task. Logged (the CLI
    prints ``warning:`` lines) and returned for the results document."""
    out = []
    for cond, counts in pred_counts.items():
        n = sum(counts)
        if n >= 2 and max(counts) >= ONE_CLASS * n:
            c = int(np.argmax(counts))
            out.append(f"{where}: {cond.upper()} answers {labels[c]!r} for {max(counts)} of {n} examples (accuracy "
                       "there is that class's share, not a measure of the task)")
    for w in out:
        log.warning(w)
    return out

DEFAULT_SEPARATOR = "\n"  # the paper's fairseq code ends each demonstration with </s>; see docs/eval.md


def separator_deviation(separator: str) -> list[str]:
    """The separator as a deviation from the paper's code, which ends each demonstration with the '</s>' token."""
    return [] if separator == "</s>" else [f"separator after each demonstration: {separator!r} (the paper's code: "
                                           "the '</s>' token)"]


@dataclass
class Prompts:
    """Token ids of one (task, seed) evaluation: the shared prefix, each test query and each option."""

    prefix_ids: list[int]  # [BOS] + demos with separators
    demo_spans: list[tuple[int, int]]  # [start, end) of each demonstration's tokens in prefix_ids (no separator)
    query_ids: list[list[int]]  # per test example: the formatted test input, without answer
    option_ids: list[list[int]]  # per label: " {label word}" tokens
    labels: list[int]
    demos: list[dict] = field(default_factory=list)  # the demonstrations actually used (after overflow drop)
    k_requested: int = 0
    demo_label_lens: list[int] = field(default_factory=list)  # per demonstration: its label tokens, at its end

    warnings: list[str] = field(default_factory=list)  # e.g. prompts longer than the model's training sequences

    @property
    def k_true(self) -> int:
        return len(self.demo_spans)

    @property
    def longest(self) -> int:
        """Tokens of the longest prompt with its longest option."""
        return len(self.prefix_ids) + max(map(len, self.query_ids)) + max(map(len, self.option_ids))

    def text(self, tokenizer, j: int) -> str:
        """Test example ``j``'s whole prompt as the model read it (before the answer): its tokens decoded, the start
        token and the demonstrations included."""
        return tokenizer.decode(self.prefix_ids + self.query_ids[j], skip_special_tokens=False)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_prompts(lm: LoadedModel, spec: TaskSpec, demos: list[dict], eval_rows: list[dict],
                  separator: str = DEFAULT_SEPARATOR, max_len: int | None = None, log_warnings: bool = True) -> Prompts:
    """Tokenize; drop demonstrations from the end while the longest prompt + option would overflow.
    ``log_warnings=False``: the prompts' warnings are kept in ``.warnings`` but not logged (an experiment that
    rebuilds prompts it has already warned about)."""
    tok = lm.tokenizer
    limit = (f"--max-len {max_len}" if max_len and max_len <= lm.max_positions
             else f"the context of model {lm.name} ({lm.max_positions} tokens)")
    max_len = min(max_len or lm.max_positions, lm.max_positions)
    query_ids = [_ids(tok, spec.format_input(r)) for r in eval_rows]
    option_ids = [_ids(tok, spec.format_answer(c)) for c in range(len(spec.label_words))]
    check_options(tok, spec, option_ids)
    sep_ids = _ids(tok, separator) if separator else []
    tail = max(map(len, query_ids)) + max(map(len, option_ids))
    start = 0 if lm.bos_id is None else 1
    if start + tail > max_len:
        raise IclgdError(f"{limit}: a test prompt of {start + tail} tokens (task {spec.name}) does not fit even without "
                         "demonstrations")
    demo_ids = [_ids(tok, spec.format_demo(d)) for d in demos]
    prefix, spans, used, label_lens = ([] if lm.bos_id is None else [lm.bos_id]), [], [], []
    for d, ids in zip(demos, demo_ids):
        if len(prefix) + len(ids) + len(sep_ids) + tail > max_len:
            break
        spans.append((len(prefix), len(prefix) + len(ids)))
        prefix += ids + sep_ids
        used.append(d)
        label_lens.append(label_tokens(tok, spec, d, ids))
    p = Prompts(prefix, spans, query_ids, option_ids, [r["label"] for r in eval_rows], used, len(demos), label_lens)
    p.warnings = long_prompt_warnings(lm, p, spec.name, log_it=log_warnings)
    return p


def long_prompt_warnings(lm: LoadedModel, prompts: Prompts, task: str, log_it: bool = True) -> list[str]:
    """A warning (logged and returned for the results) when a prompt is longer than the sequences the model was
    trained on (:attr:`LoadedModel.trained_len`): accuracy there measures length generalisation, not ICL."""
    n = lm.trained_len
    if n is None or prompts.longest <= n:
        return []
    w = (f"task {task}, k={prompts.k_true}: prompts of up to {prompts.longest} tokens, longer than the {n}-token "
         f"sequences model {lm.name} was trained on (accuracy there measures length generalisation, not ICL)")
    if log_it:
        log.warning(w)
    return [w]


def check_options(tok, spec: TaskSpec, option_ids: list[list[int]]) -> None:
    """Label words the model can tell apart: none empty, none mapped to the unknown token, no two with the same
    token ids (they would always tie, and argmax would always pick the first)."""
    unk = getattr(tok, "unk_token_id", None)
    seen: dict[tuple, int] = {}
    for c, ids in enumerate(option_ids):
        word = spec.label_words[c]
        if not ids:
            raise IclgdError(f"task {spec.name}: label word {word!r} tokenizes to nothing with this model's tokenizer")
        if unk is not None and unk in ids:
            raise IclgdError(f"task {spec.name}: label word {word!r} maps to the unknown token of this model's "
                             "tokenizer; choose label words in its vocabulary")
        if tuple(ids) in seen:
            raise IclgdError(f"task {spec.name}: label words {spec.label_words[seen[tuple(ids)]]!r} and {word!r} have "
                             f"the same token ids {ids} for this model's tokenizer; every prediction would tie")
        seen[tuple(ids)] = c


def label_tokens(tok, spec: TaskSpec, row: dict, ids: list[int]) -> int:
    """How many tokens at the end of a demonstration's ids ``ids`` are its answer (the label word): the tokens
    after those of its input alone. (A tokenizer may merge across the boundary; then the answer owns every
    token from the first one that differs from the input's tokens.)"""
    inp = _ids(tok, spec.format_input(row))
    n = 0
    while n < min(len(inp), len(ids)) and inp[n] == ids[n]:
        n += 1
    if n >= len(ids):
        raise IclgdError(f"task {spec.name}: a demonstration's answer adds no token to its input (label "
                         f"{row.get('label')!r}); --ft-loss label has nothing to learn from")
    return len(ids) - n


# ----------------------------------------------------------------------------- scoring


def _pad_right(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def encode_prefix(lm: LoadedModel, prefix_ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run the prefix once; return each layer's (keys, values), shape (1, n_kv_heads, P, head_dim).

    A plain DynamicCache keeps every key also in sliding-window layers (Gemma-2/3, Mistral), whose own
    cache would keep only the last W; the masks of the later passes then hide what the window hides."""
    from transformers import DynamicCache

    model = lm.model
    dev = lm.input_device
    with torch.no_grad(), native_gqa(lm):  # a sliding window masks the prefix too
        out = model(input_ids=torch.tensor([prefix_ids], device=dev), use_cache=True, cache=DynamicCache())
    cache = getattr(out, "cache", None)
    if cache is None or not getattr(cache, "layers", None):
        from iclgd.core.errors import IclgdError

        raise IclgdError(f"--model {lm.name}: its forward pass returns no key/value cache, so it is not a decoder-only "
                         f"causal LM ({lm.model_type}, e.g. an encoder such as BERT); iclgd needs one")
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache_for(prefix_kv, n_rows: int):
    """The prefix's cache expanded over ``n_rows`` rows; each layer's update concatenates a fresh buffer (the
    reference for :class:`PrefixCache`)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(prefix_kv):
        cache.update(k.expand(n_rows, *k.shape[1:]), v.expand(n_rows, *v.shape[1:]), i)
    return cache


REUSE_BUFFERS = True  # PrefixCache (one buffer per pass) instead of a fresh concatenation per batch


class _PrefixLayer:
    """One layer's keys (or values) of the prefix, expanded over at most ``rows`` batch rows, with room for
    ``t_max`` more positions: (rows, H_kv, P + t_max, d_head), allocated and filled once per scoring pass. A batch
    writes its own tokens' keys after the prefix and attends to a view; nothing is allocated per batch."""

    def __init__(self, prefix: torch.Tensor, rows: int, t_max: int):
        _, H, P, d = prefix.shape  # (1, H_kv, P, d_head)
        self.buf = prefix.new_empty((rows, H, P + t_max, d))
        self.buf[:, :, :P] = prefix
        self.P = self.P0 = P

    def extend(self, t: int) -> None:
        """Row 0's last ``t`` written positions become part of every row's prefix (copied to the other rows)."""
        self.buf[1:, :, self.P: self.P + t] = self.buf[:1, :, self.P: self.P + t]
        self.P += t

    def rewind(self) -> None:
        self.P = self.P0

    def view(self, n: int, t: int = 0) -> torch.Tensor:
        return self.buf[:n, :, : self.P + t]

    def write(self, new: torch.Tensor) -> torch.Tensor:  # new: (n, H_kv, t, d_head)
        n, t = new.shape[0], new.shape[2]
        self.buf[:n, :, self.P: self.P + t] = new
        return self.view(n, t)


def prefix_cache(prefix_kv, rows: int, t_max: int):
    """A transformers cache over :class:`_PrefixLayer` buffers: ``cache.start(n)`` before each batch of ``n``
    rows. Equal, batch for batch, to :func:`_cache_for` (tests/test_scoring_engine.py); under glibc's default
    allocator the per-batch concatenations of that one fragment the heap (several MB each, freed and allocated again), and the
    peak host memory moves by hundreds of MB (benchmarks/bench_scale.py)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    bufs = [(_PrefixLayer(k, rows, t_max), _PrefixLayer(v, rows, t_max)) for k, v in prefix_kv]

    class Layer(DynamicLayer):
        def __init__(self, kb, vb):
            super().__init__()
            self.kb, self.vb, self.is_initialized = kb, vb, True
            self.device = kb.buf.device

        def update(self, key_states, value_states, *args, **kwargs):
            self.keys, self.values = self.kb.write(key_states), self.vb.write(value_states)
            return self.keys, self.values

    class PrefixCache(DynamicCache):
        def start(self, n: int):
            """Every layer back to the prefix, for a batch of ``n`` rows."""
            for layer in self.layers:
                layer.keys, layer.values = layer.kb.view(n), layer.vb.view(n)
            return self

        def extend(self, t: int):
            """After a one-row pass of ``t`` tokens (``start(1)``): those tokens join the prefix of every row (e.g. a
            query's context shared by rows that differ only in an edit)."""
            for layer in self.layers:
                layer.kb.extend(t), layer.vb.extend(t)
            return self

        def rewind(self):
            """Back to the prefix the cache was built with."""
            for layer in self.layers:
                layer.kb.rewind(), layer.vb.rewind()
            return self

    # (a method, not a closure stored on the cache: a closure would make a reference cycle, and the buffers would
    # outlive the pass until the cyclic garbage collector ran; measured: ~250 MB held through the rest of a unit)
    cache = PrefixCache()
    cache.layers = [Layer(kb, vb) for kb, vb in bufs]
    return cache


def score_options(lm: LoadedModel, prompts: Prompts, batch_size: int = 8, reuse_prefix: bool = True,
                  progress: bool | str = False, example_ids: list[int] | None = None,
                  observer: Observer | None = None) -> np.ndarray:
    """Mean log-probability of every option's tokens after each prompt, shape (n_examples, n_options).

    With ``reuse_prefix`` the prefix is encoded once and its KV cache expanded over each batch of
    (example, option) rows; without, every row re-encodes prefix + query + option (the reference).
    Rows are right-padded, so padding never precedes a real token and positions need no correction.
    With an ``observer`` (:class:`iclgd.engine.capture.Observer`), the same forward passes also record, per
    example, what the ICL-vs-FT metrics need at the prediction position.
    """
    batch_size = resolve_batch_size(lm, batch_size)
    if observer is not None and not (reuse_prefix and prompts.prefix_ids):
        raise ValueError("captures are taken on the prefix-reuse path only (a prompt with a start token)")
    reuse_prefix = reuse_prefix and bool(prompts.prefix_ids)  # --bos none and no demonstrations: nothing to reuse
    pad = next(t for t in (lm.tokenizer.pad_token_id, lm.tokenizer.eos_token_id, 0) if t is not None)
    examples = list(range(len(prompts.query_ids))) if example_ids is None else list(example_ids)
    C = len(prompts.option_ids)
    out = np.full((len(prompts.query_ids), C), np.nan)
    # When every option is one token, one row per example scores them all from the last query position.
    single = all(len(o) == 1 for o in prompts.option_ids)
    if observer is not None and observer.position == "label-token":
        single = False  # the label-token position lies inside option 0's row
    # longest first: batches of similar length waste little on padding
    order = sorted(examples, key=lambda i: -len(prompts.query_ids[i]))
    P = len(prompts.prefix_ids)
    if observer is not None:
        with Recorder(lm) as rec:
            prefix_kv = encode_prefix(lm, prompts.prefix_ids)
            observer.set_prefix(rec, P, prefix_kv)
    else:
        prefix_kv = encode_prefix(lm, prompts.prefix_ids) if reuse_prefix else None
    if reuse_prefix and REUSE_BUFFERS:
        t_max = max(len(prompts.query_ids[i]) for i in examples) + (0 if single else max(map(len, prompts.option_ids)))
        cache = prefix_cache(prefix_kv, batch_size * (1 if single else C), t_max)
    else:
        cache = None
    w32, b32 = head_weights(lm)
    bar = progress_bar(total=len(order), desc=progress if isinstance(progress, str) else "scoring",
                       enabled=bool(progress), leave=False)
    with torch.no_grad(), native_gqa(lm):
        b = 0
        while b < len(order):
            batch = order[b: b + batch_size]
            try:
                _score_batch(lm, prompts, batch, single, reuse_prefix, prefix_kv, observer, pad, w32, b32, out, cache)
            except torch.cuda.OutOfMemoryError:
                if batch_size == 1:
                    raise
                torch.cuda.empty_cache()  # a batch too large for the GPU: retry it halved (same results up to rounding)
                batch_size = max(1, batch_size // 2)
                lm.batch_limit = batch_size  # later passes start here; results record it as the size applied
                log.warning("a batch ran out of GPU memory: batch size now %d (results record it)", batch_size)
                continue
            b += len(batch)
            bar.update(len(batch))
    bar.close()
    return out


def resolve_batch_size(lm: LoadedModel, batch_size: int | str) -> int:
    """``--batch-size``: an int as given (at most the size that fitted after a halving); 'auto' the largest that fits: from AUTO_GPU_BATCH down (halved on a GPU
    out-of-memory error, in :func:`score_options`), AUTO_CPU_BATCH on CPU (larger batches are no faster there)."""
    if batch_size == "auto":
        batch_size = AUTO_GPU_BATCH if lm.input_device.type == "cuda" else AUTO_CPU_BATCH
    elif not isinstance(batch_size, int) or batch_size < 1:  # <= 0 would score nothing and leave NaN log-probs
        raise IclgdError(f"--batch-size {batch_size}: expected 'auto' or a positive integer")
    return min(batch_size, lm.batch_limit or batch_size)  # after an out-of-memory halving, the size that fitted


AUTO_GPU_BATCH, AUTO_CPU_BATCH = 64, 8


def _score_batch(lm, prompts, batch, single, reuse_prefix, prefix_kv, observer, pad, w32, b32, out, cache) -> None:
    """Score one batch of examples into ``out`` (and hand its captures to the observer)."""
    base, dev, head_dev = lm.model.base_model, lm.input_device, w32.device
    P = len(prompts.prefix_ids)
    rows, meta = [], []  # meta: (example, [(option, first position predicting it, its tokens)])
    for i in batch:
        q = prompts.query_ids[i]
        off = 0 if reuse_prefix else P
        if single:
            rows.append(q if reuse_prefix else prompts.prefix_ids + q)
            meta.append((i, [(c, off + len(q) - 1, o) for c, o in enumerate(prompts.option_ids)]))
        else:
            for c, o in enumerate(prompts.option_ids):
                rows.append((q + o) if reuse_prefix else prompts.prefix_ids + q + o)
                meta.append((i, [(c, off + len(q) - 1, o)]))
    ids, mask = _pad_right(rows, pad)
    ids, mask = ids.to(dev), mask.to(dev)
    if reuse_prefix:
        full_mask = torch.cat([torch.ones(len(rows), P, dtype=torch.long, device=dev), mask], dim=1)
        with Recorder(lm, detach=True) if observer is not None else nullcontext() as rec:
            kv = cache.start(len(rows)) if cache is not None else _cache_for(prefix_kv, len(rows))
            hidden = base(input_ids=ids, attention_mask=full_mask, cache=kv, use_cache=True).last_hidden_state
            if observer is not None:
                _observe(observer, rec, prompts, meta, P, kv)
    else:
        hidden = base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    option_scores(lm, hidden, meta, w32, b32, out)


def option_scores(lm: LoadedModel, hidden: torch.Tensor, meta, w32: torch.Tensor, b32: torch.Tensor | None,
                  out: np.ndarray) -> None:
    """``out[i, c]``: the mean log-probability of option c's tokens, from the final hidden states ``hidden``
    (rows, T, d_model) of a batch; ``meta`` per row: (i, [(c, position predicting the option's first token, its
    tokens), ...]). The unembedding only where a label token is predicted (hidden at t predicts token t+1): one
    product for every such position of the batch (an option's row or an example's shared last position counted
    once), in chunks."""
    head_dev = w32.device
    where, rows_pos = [], {}
    for r, (i, opts) in enumerate(meta):
        for c, start, o in opts:
            where.append((i, c, [rows_pos.setdefault((r, start + t), len(rows_pos)) for t in range(len(o))], o))
    r_idx, t_idx = (torch.tensor(x, device=hidden.device) for x in zip(*rows_pos))
    at = torch.tensor([p for _, _, ps, _ in where for p in ps], device=head_dev)  # each option token's position…
    tok = torch.tensor([t for _, _, _, o in where for t in o], device=head_dev)  # …and the token it must predict
    picked = torch.empty(len(at), dtype=torch.float64, device=head_dev)  # one entry per option token
    for a in range(0, len(rows_pos), HEAD_CHUNK):
        lp = _log_probs(lm, hidden[r_idx[a: a + HEAD_CHUNK], t_idx[a: a + HEAD_CHUNK]].to(head_dev), w32, b32)
        sel = (at >= a) & (at < a + HEAD_CHUNK)  # (chunk, vocab) log-probs; keep only the tokens asked for
        picked[sel] = lp[at[sel] - a, tok[sel]]
    lens = [len(o) for _, _, _, o in where]
    means = torch.stack([x.mean() for x in picked.split(lens)])
    for (i, c, _, _), v in zip(where, means.cpu().tolist()):  # one device-to-host copy per batch
        out[i, c] = v


def head_weights(lm: LoadedModel) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The unembedding's weight and bias for :func:`_log_probs`: in fp32 whatever the model dtype (in bf16, close
    options tie or flip); an fp64 model keeps fp64."""
    head = lm.model.get_output_embeddings()
    acc = torch.promote_types(head.weight.dtype, torch.float32)
    return head.weight.to(acc), (head.bias.to(acc) if getattr(head, "bias", None) is not None else None)


HEAD_CHUNK = 64  # positions per unembedding product (Gemma-3's 262k-token vocabulary: 134 MB of float64 log-probs)


def _log_probs(lm: LoadedModel, h: torch.Tensor, w32: torch.Tensor, b32: torch.Tensor | None) -> torch.Tensor:
    """Next-token log-probabilities (n, vocab) in float64 of final hidden states ``h`` (n, d_model): the unembedding
    in fp32 whatever the model dtype (fp64 for an fp64 model), then the final-logit soft-cap ``cap·tanh(z / cap)``
    where the model has one (Gemma-2), as the model's own forward pass applies it."""
    z = F.linear(h.to(w32.dtype), w32, b32)
    cap = getattr(lm.model.config, "final_logit_softcapping", None)
    if cap:
        z = cap * torch.tanh(z / cap)
    return torch.log_softmax(z.double(), dim=-1)


def _observe(observer, rec, prompts: Prompts, meta, P: int, cache=None) -> None:
    """Hand each example's first row to the observer, at its prediction position (the whole batch at once)."""
    items, seen = [], set()
    for r, (i, opts) in enumerate(meta):
        if i in seen:
            continue
        seen.add(i)
        nq = len(prompts.query_ids[i])
        pos = nq - 1 if observer.position == "last" else nq  # label-token: option 0's first token
        items.append((i, r, pos, nq))
    observer.take_batch(rec, items, P, cache)


# ----------------------------------------------------------------------------- ZSL / ICL evaluation


@dataclass
class EvalConfig:
    """How one ZSL or ICL pass builds and scores its prompts."""

    k: int = O.k_field(32, 0, "demonstrations requested (fewer if the context overflows)")
    seed: int = O.option(1, "demonstration seed", check=O.a_seed, cli=False)  # set per run from the job's seeds
    balanced: bool = O.balanced_field()
    separator: str = O.separator_field()
    max_len: int = O.max_len_field()
    batch_size: int | str = O.batch_size_field()  # or a positive integer (see resolve_batch_size)
    record_prompts: bool = O.record_prompts_field()

    def __post_init__(self):
        O.validate(self)


def score_split(lm: LoadedModel, data: TaskData, cfg: EvalConfig, icl: bool, progress: bool = True) -> dict:
    """ZSL (``icl=False``) or ICL accuracy of one task: accuracy, prediction counts and per-example records.

    ZSL depends on the test set only, not on the seed: a sweep scores it once and shares it across seeds."""
    spec = data.spec
    demos = sample_demos(data.demo_pool, cfg.k, cfg.seed, cfg.balanced, len(spec.label_words)) if icl else []
    prompts = build_prompts(lm, spec, demos, data.eval_rows, cfg.separator, cfg.max_len)
    name = f"{spec.name} ICL k={prompts.k_true}" if icl else f"{spec.name} ZSL"
    lp = score_options(lm, prompts, cfg.batch_size, progress=progress and name)
    labels, pred = np.array(prompts.labels), lp.argmax(1)
    out = {"task": spec.name, "n": len(labels), "acc": float((pred == labels).mean()),
           "majority_baseline": float(np.bincount(labels).max() / len(labels)),
           # a model that always answers one label sits at the majority baseline: the counts show it
           "pred_counts": np.bincount(pred, minlength=len(spec.label_words)).tolist(),
           "records": [{"idx": row.get("idx"), "label": int(labels[j]), "pred": int(pred[j]),
                        "logprobs": [round(float(x), 6) for x in lp[j]],
                        **({"prompt": prompts.text(lm.tokenizer, j)} if icl and cfg.record_prompts else {})}
                       for j, row in enumerate(data.eval_rows)]}
    if prompts.warnings:
        out["prompt_warnings"] = prompts.warnings
    if icl:
        out.update({"seed": cfg.seed, "k_requested": cfg.k, "k_true": prompts.k_true,
                    "prefix_tokens": len(prompts.prefix_ids), "demo_idx": [d.get("idx") for d in prompts.demos]})
    return out


def evaluate(lm: LoadedModel, data: TaskData, cfg: EvalConfig, progress: bool = True, zsl: dict | None = None
             ) -> dict:
    """ZSL and ICL accuracy of one task for one seed, with per-example records. ``zsl``: the task's ZSL
    :func:`score_split` when already computed (it does not depend on the seed)."""
    zsl = zsl if zsl is not None else score_split(lm, data, cfg, icl=False, progress=progress)
    icl = score_split(lm, data, cfg, icl=True, progress=progress)
    records = [
        {"idx": z["idx"], "input": data.spec.format_input(row), "demo_idx": icl["demo_idx"], "label": z["label"],
         "zsl_pred": z["pred"], "icl_pred": i["pred"],
         "zsl_logprobs": z["logprobs"], "icl_logprobs": i["logprobs"],
         **({"icl_prompt": i["prompt"]} if "prompt" in i else {})}
        for z, i, row in zip(zsl["records"], icl["records"], data.eval_rows)
    ]
    return {
        **({"prompt_warnings": icl["prompt_warnings"]} if icl.get("prompt_warnings") else {}),
        "task": data.spec.name,
        "seed": cfg.seed,
        "n": icl["n"],
        "k_requested": cfg.k,
        "k_true": icl["k_true"],
        "prefix_tokens": icl["prefix_tokens"],
        "demo_idx": icl["demo_idx"],
        "acc_zsl": zsl["acc"],
        "acc_icl": icl["acc"],
        "majority_baseline": icl["majority_baseline"],
        "zsl_pred_counts": zsl["pred_counts"],
        "icl_pred_counts": icl["pred_counts"],
        "records": records,
    }
