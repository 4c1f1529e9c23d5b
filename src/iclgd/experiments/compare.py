"""``iclgd compare``: ZSL, ICL and finetuning on the same demonstrations, and the paper's four metrics.

For one model, task and seed: a ZSL run, an ICL run and, after K/V finetuning on the ICL prompt's
demonstrations, a ZSL run of the finetuned model ("FT"). The captures the metrics need come from the
same forward passes that produce the predictions (:mod:`iclgd.engine.capture`). The metrics are the pure
functions of :mod:`iclgd.core.metrics`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from iclgd.core import metrics as M
from iclgd.core import options as O
from iclgd.core.errors import IclgdError
from iclgd.core.io import atomic_write_json, atomic_write_jsonl
from iclgd.core.models import LoadedModel, as_loaded, model_name, repeat_kv, run_versions
from iclgd.core.tasks import TaskData, load_tasks, sample_demos
from iclgd.engine import dual
from iclgd.engine.capture import Observer
from iclgd.engine.finetune import REINIT, FTRecord, Snapshot, finetune, reinit_untrained
from iclgd.engine.scoring import (Prompts, build_prompts, one_class_warnings, resolve_batch_size, score_options,
                                  separator_deviation)
from iclgd.experiments.protocol import Experiment, Result, UnitKind, tidy_rows, writing

# The K/V finetuning rate of a task without one in its spec. The built-in tasks carry the paper's per-task
# rates (GiilDe/ft-vs-icl configs for the 1.3B model, probably Dai et al. App. B) in their JSON files; they
# are not tuned for other models: use --lr-search to pick one on held-out train data.
DEFAULT_LR = 1e-3
LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


@dataclass
class CompareConfig:
    """How one (model, task, seed) compare runs: the demonstrations, finetuning and the metrics' settings."""

    k: int = O.k_field(32, 1, "demonstrations (>= 1: finetuning needs at least one)")
    lr: float | None = O.option(None, "FT learning rate (default: the paper's per-task rate)", type=float,
                                check=O.positive, applies=("lr_search", (False,), "no --lr-search (the search "
                                                                                   "picks the rate)"))  # None: the task spec's lr, else DEFAULT_LR
    lr_search: bool = O.option(False, "pick the rate from a grid on held-out train examples")
    lr_grid: tuple[float, ...] = O.option(LR_GRID, "the rates --lr-search tries", cli=False)
    lr_holdout: int = O.option(64, "train examples (disjoint from the demonstrations) that judge the grid", cli=False)
    ft_params: str = O.option("kv", "kv (the paper) or all (full-model control)", choices=("kv", "all"))
    ft_mode: str = O.option("gd", "gd or lcgd (layer-causal GD, Deutch et al. 2024)", choices=("gd", "lcgd"))
    ft_loss: str = O.option("all", "FT loss: all (LM loss over every demonstration token, the paper's) or label "
                                   "(the label tokens only, e.g. for models trained on label positions)",
                            choices=("all", "label"))
    position: str = O.option("last", "last prompt token, or label-token (the official code)",
                             choices=("last", "label-token"))
    kendall_n: int = O.option(100, "test examples of the Kendall rank correlation (>= 1)", check=O.min_int(1))
    simam_segment: str = O.option("after-context", "after-context (the paper's code: every position after the "
                                                   "context) or input-only (the test input's tokens)",
                                  choices=("after-context", "input-only"))
    kendall_scale: str = O.option("paper", "FT-side logits: paper (head_dim^-1 · q·q) or none (q·q)",
                                  choices=("paper", "none"))
    updates_n: int = O.option(100, "test examples on which ΔW_ICL is compared with ΔW_FT (0: skip)",
                              check=O.min_int(0))
    untrained_seed: int | None = O.option(None, "init seed of the untrained control for every run seed (default: "
                                                "the run seed)", type=int, check=O.a_seed)
    untrained_reinit: str = O.option("blocks", "what the untrained control re-initialises: blocks (attention and "
                                               "MLP; Deutch et al.) or all (the embeddings too, which alone can answer "
                                               "above chance)", choices=REINIT)
    balanced: bool = O.balanced_field()
    separator: str = O.separator_field()
    max_len: int = O.max_len_field()
    batch_size: int | str = O.batch_size_field()  # prompts per forward pass (engine.scoring.resolve_batch_size)
    record_prompts: bool = O.record_prompts_field()

    def __post_init__(self):
        O.validate(self)


def _stats(per_layer: np.ndarray, n_examples: np.ndarray | None = None) -> dict:
    """Overall (mean over the layers where the metric is defined) and per layer, with what they rest on:
    ``n_layers`` defined layers, and with ``n_examples`` the defined examples per layer."""
    per_layer = np.asarray(per_layer, dtype=float)
    overall, n_layers = M.mean_defined(per_layer)
    out = {"overall": float(overall), "per_layer": [float(x) for x in per_layer], "n_layers": int(n_layers)}
    if n_examples is not None:
        out["n_examples_per_layer"] = [int(x) for x in n_examples]
    return out


def _stats_running(rm: M.RunningMean, per_example: bool = True) -> dict:
    """:func:`_stats` of a mean over examples (``per_example``: with the defined examples per layer)."""
    mean, n = rm.result()
    return _stats(mean, n if per_example else None)


def _stats_ex(per_example: np.ndarray) -> dict:
    """:func:`_stats` of a per-example metric (n_examples, n_layers): its per-layer means over defined examples."""
    rm = M.RunningMean()
    rm.add(per_example)
    return _stats_running(rm)


# Deviations from the paper's code that hold for every compare run (each results file and report lists them)
FT_DEMOS_DEVIATION = ("FT demonstrations: finetuning uses the demonstrations that fit in the ICL prompt (the same "
                      "ones on both sides); the paper's FT loader used all k, its ICL prompt only those that fit")


def compare_deviations(cfg: CompareConfig) -> list[str]:
    """The deviations from the paper's code that a compare run with ``cfg`` applies."""
    out = [FT_DEMOS_DEVIATION,
           "SimAOU and SimAM_Δ: an example whose FT update is zero is left out as undefined (the paper's code "
           "counts cosine 0); every figure records how many layers and examples it rests on"]
    if cfg.position == "last":
        out.append("prediction position: the last prompt token (the paper's code: the appended label token of "
                   "option 0; --position label-token)")
    if cfg.simam_segment != "after-context":
        out.append("SimAM over the test input's tokens only (the paper's code: every position after the context, "
                   "including the label token in its convention)")
    if cfg.kendall_scale != "paper":
        out.append("Kendall FT side: unscaled q·q logits (the paper's code: head_dim^-1 · q·q)")
    if cfg.untrained_seed is not None:
        out.append(f"untrained control initialised with seed {cfg.untrained_seed} for every run seed")
    if cfg.ft_loss != "all":
        out.append("FT loss over the demonstrations' label tokens only (--ft-loss label; the paper's: the LM loss "
                   "over every demonstration token)")
    return out + separator_deviation(cfg.separator)


def _label_lens(icl: Prompts, cfg: CompareConfig) -> list[int] | None:
    """What ``finetune`` takes for ``cfg.ft_loss``: each demonstration's label tokens, or None for every token."""
    return icl.demo_label_lens if cfg.ft_loss == "label" else None


def _heldout(lp: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Held-out loss (mean cross-entropy of the gold label over the options' log-probs) and accuracy."""
    from scipy.special import logsumexp

    nll = -(lp[np.arange(len(labels)), labels] - logsumexp(lp, axis=1))
    return float(nll.mean()), float((lp.argmax(1) == labels).mean())


LOSS_TIE = 1e-9  # held-out losses closer than this are a tie


def _choose_lr(lm: LoadedModel, data: TaskData, cfg: CompareConfig, seed: int, demos: list[dict],
               demo_ids: list[list[int]], label_lens: list[int] | None = None) -> tuple[float, dict | None]:
    """The FT rate: given, the task's, or (``lr_search``) the grid rate of lowest held-out loss after finetuning
    on the demonstrations. Each grid rate's held-out loss, accuracy and changed predictions (against the model
    before FT) are recorded; rates tied at the lowest loss are reported, and the smallest of them is taken."""
    if not cfg.lr_search:
        lr = cfg.lr if cfg.lr is not None else data.spec.lr if data.spec.lr is not None else DEFAULT_LR
        return lr, None
    used = {id(d) for d in demos}
    order = np.random.default_rng(seed).permutation(len(data.demo_pool))
    held = [data.demo_pool[i] for i in order if id(data.demo_pool[i]) not in used][: cfg.lr_holdout]
    if not held:
        raise IclgdError("--lr-search: no train examples left beside the demonstrations")
    p = build_prompts(lm, data.spec, [], held, cfg.separator, cfg.max_len)
    labels = np.array(p.labels)
    before = score_options(lm, p, cfg.batch_size)
    loss0, acc0 = _heldout(before, labels)
    grid = []
    for lr in cfg.lr_grid:
        snap = Snapshot(lm, cfg.ft_params)
        try:
            finetune(lm, demo_ids, lr, cfg.ft_params, cfg.ft_mode, record=False, label_lens=label_lens)
            lp = score_options(lm, p, cfg.batch_size)
            loss, acc = _heldout(lp, labels)
            changed = int((lp.argmax(1) != before.argmax(1)).sum())
        except IclgdError:  # diverged (NaN loss) at this rate
            loss = float("nan")
        snap.restore()
        if not np.isfinite(loss):  # diverged, or finite steps to a model whose held-out loss is not
            loss, acc, changed = float("nan"), float("nan"), None
        grid.append({"lr": lr, "holdout_loss": loss, "holdout_acc": acc, "changed_predictions": changed})
    finite = [g for g in grid if g["holdout_loss"] == g["holdout_loss"]]
    if not finite:
        raise IclgdError("--lr-search: finetuning diverged at every rate of the grid")
    best = min(g["holdout_loss"] for g in finite)
    tied = [g["lr"] for g in finite if g["holdout_loss"] - best <= LOSS_TIE]
    return tied[0], {"grid": grid, "criterion": "lowest held-out loss", "tied": tied,
                     "tie_break": "the smallest tied rate" if len(tied) > 1 else None,
                     "before_ft": {"holdout_loss": loss0, "holdout_acc": acc0},
                     "holdout_n": len(held), "holdout_source": "train split, outside the demos"}


class _Laps:
    """Wall time of each phase, in seconds since the previous one."""

    def __init__(self):
        self.phases, self._t = {}, time.perf_counter()

    def __call__(self, key: str) -> None:
        now = time.perf_counter()
        self.phases[key] = round(now - self._t, 3)
        self._t = now


def _observed(lm: LoadedModel, prompts: Prompts, cfg: CompareConfig, demo_positions: list[int], progress,
              keep_q: int = 0, keep_demo: int = 0, keep_kv: int = 0, keep_prefix_kv: bool = False
              ) -> tuple[np.ndarray, Observer]:
    """Option log-probs (n_examples, n_options) and the captures of the same forward passes (the query of the
    first ``keep_q`` examples, the demonstration scores of the first ``keep_demo``, the tokens' keys and values of
    the first ``keep_kv`` and of the prefix: what the metrics read)."""
    obs = Observer(lm, demo_positions, cfg.position, keep_q=keep_q, keep_demo=keep_demo, keep_kv=keep_kv,
                   keep_prefix_kv=keep_prefix_kv)
    return score_options(lm, prompts, cfg.batch_size, progress=progress, observer=obs), obs


class ZslCache:
    """The ZSL pass (log-probs and captures) of one model on one test set, computed once and shared by every seed:
    ZSL depends on the test set only. Only for a model whose weights stay the same between seeds (the untrained
    control is re-initialised per seed and gets none). Holds one test set at a time."""

    def __init__(self):
        self.key, self.value = None, None

    def get(self, key, compute) -> tuple[tuple, bool]:
        """(the value for ``key``, whether it was reused)."""
        if key == self.key:
            return self.value, True
        self.key, self.value = None, None  # free the previous test set's captures first
        self.value = compute()
        self.key = key
        return self.value, False


def compare_seed(lm: LoadedModel, data: TaskData, cfg: CompareConfig, seed: int, progress: bool = True,
                 zsl_cache: ZslCache | None = None, label: str = "") -> tuple[dict, list[dict], dict]:
    """One (model, task, seed): returns (result, per-example records, phase timings in seconds). With a
    ``zsl_cache`` the ZSL pass of an earlier seed on the same test set is reused (``phases["zsl_reused"]``);
    ``label`` ("untrained") marks a control's progress bars."""
    spec = data.spec
    demos = sample_demos(data.demo_pool, cfg.k, seed, cfg.balanced, len(spec.label_words))
    icl = build_prompts(lm, spec, demos, data.eval_rows, cfg.separator, cfg.max_len)
    if demos and icl.k_true == 0:  # finetuning would take no step and the metrics would compare nothing
        raise IclgdError(f"task {spec.name}: not one of the {cfg.k} demonstrations fits in the context "
                         f"({min(cfg.max_len, lm.max_positions)} tokens, model {lm.name}) beside the longest test "
                         "prompt; compare needs at least one (a model with a longer context, or a larger --max-len)")
    zsl = build_prompts(lm, spec, [], data.eval_rows, cfg.separator, cfg.max_len)
    demo_positions = [i for a, b in icl.demo_spans for i in range(a, b)]
    demo_ids = [icl.prefix_ids[a:b] for a, b in icl.demo_spans]
    name, lap = f"{spec.name} s{seed}{' ' + label if label else ''}", _Laps()
    n_upd, nk = min(cfg.updates_n, len(data.eval_rows)), min(cfg.kendall_n, len(data.eval_rows))
    zsl_pass = lambda: _observed(lm, zsl, cfg, [], progress and f"{name} ZSL", keep_kv=n_upd)  # noqa: E731
    key = (spec.name, tuple(zsl.prefix_ids), tuple(map(tuple, zsl.query_ids)), cfg.position, cfg.batch_size, n_upd)
    (lp_z, obs_z), reused = zsl_cache.get(key, zsl_pass) if zsl_cache is not None else (zsl_pass(), False)
    lap("zsl")
    lp_i, obs_i = _observed(lm, icl, cfg, demo_positions, progress and f"{name} ICL", keep_q=n_upd, keep_demo=nk,
                            keep_prefix_kv=n_upd > 0)
    lap("icl")
    lr, search = _choose_lr(lm, data, cfg, seed, icl.demos, demo_ids, _label_lens(icl, cfg))
    lap("lr_search")
    snap = Snapshot(lm, cfg.ft_params)
    try:
        ft = finetune(lm, demo_ids, lr, cfg.ft_params, cfg.ft_mode, label_lens=_label_lens(icl, cfg))
        ft_params_changed = snap.changed()
        lap("ft")
        lp_f, obs_f = _observed(lm, zsl, cfg, [], progress and f"{name} FT", keep_q=nk, keep_kv=n_upd)
        lap("ft_zsl")
    finally:
        snap.restore()
    updates = _updates_from(obs_z, obs_i, obs_f, (len(zsl.prefix_ids), len(icl.prefix_ids)), n_upd, seed)
    lap("updates")
    labels = np.array(icl.labels)
    kendall = _kendall(icl, obs_i, obs_f, ft, nk, seed, cfg.kendall_scale)
    lap("metrics_kendall")
    outcomes = _outcomes(labels, (lp_z, lp_i, lp_f), len(spec.label_words))
    similarities, moved = _similarities((obs_z, obs_i, obs_f), len(labels), seed, cfg.simam_segment)
    lap("metrics_similarities")
    # a finetuning that changed no prediction and no hidden state: its similarities are undefined, not 0
    ft_changed = {"params": ft_params_changed, "predictions": int((lp_f.argmax(1) != lp_z.argmax(1)).sum()),
                  "attn_outputs": moved}
    ft_changed["nothing"] = ft_changed["predictions"] == 0 and ft_changed["attn_outputs"] == 0
    result = {"seed": seed, "n": len(labels), "k_true": icl.k_true, "demo_idx": [d.get("idx") for d in icl.demos],
              "position": cfg.position, "lr": lr, "lr_search": search, "ft_losses": [round(x, 6) for x in ft.losses],
              "ft_master_fp32": ft.master_fp32, "ft_changed": ft_changed, **outcomes,
              **similarities, "kendall": kendall,
              "updates": updates, **({"prompt_warnings": icl.warnings} if icl.warnings else {})}
    demo_idx = [d.get("idx") for d in icl.demos]
    records = [{"seed": seed, "idx": data.eval_rows[j].get("idx"), "input": spec.format_input(data.eval_rows[j]),
                "demo_idx": demo_idx, "label": int(labels[j]),
                **{f"{s}_pred": int(lp[j].argmax()) for s, lp in zip(SETTINGS, (lp_z, lp_i, lp_f))},
                **{f"{s}_logprobs": [round(float(x), 6) for x in lp[j]] for s, lp in zip(SETTINGS, (lp_z, lp_i, lp_f))},
                **({"icl_prompt": icl.text(lm.tokenizer, j)} if cfg.record_prompts else {})}
               for j in range(len(labels))]
    return result, records, {**lap.phases, "zsl_reused": reused}


SETTINGS = ("zsl", "icl", "ft")


def _f64(a: np.ndarray) -> np.ndarray:
    """Captures are kept in fp32 (computed so); the metrics run in float64 on them."""
    return np.asarray(a, dtype=np.float64)


def _outcomes(labels: np.ndarray, logprobs: tuple[np.ndarray, ...], C: int) -> dict:
    """Accuracy and predictions per class of ZSL, ICL and FT, and Rec2FTP."""
    pz, pi, pf = (lp.argmax(1) for lp in logprobs)
    r2f, den = RUN["rec2ftp"](pz == labels, pf == labels, pi == labels)
    return {"acc": {"zsl": float((pz == labels).mean()), "icl": float((pi == labels).mean()),
                    "ft": float((pf == labels).mean()), "majority": float(np.bincount(labels).max() / len(labels))},
            "pred_counts": {s: np.bincount(p, minlength=C).tolist() for s, p in zip(SETTINGS, (pz, pi, pf))},
            "rec2ftp": {"value": r2f, "denominator": den}}


# what computes each figure: the registry's per-example functions (iclgd.core.metrics.METRICS)
RUN = {name: m.function for name, m in M.METRICS.items() if m.function is not None}
METRICS_CHUNK = 64  # examples whose captures are read back and compared at a time


def _similarities(observers: tuple[Observer, ...], N: int, seed: int, segment: str) -> tuple[dict, int]:
    """SimAOU and SimAM per layer, with their baselines and the layers and examples each rests on; and how many
    examples' attention outputs FT changed (on some layer).

    The captures are read back ``METRICS_CHUNK`` examples at a time, in test-set order, and every figure is a
    running mean (:class:`iclgd.core.metrics.RunningMean`), so memory does not grow with the test set; the random
    baselines are drawn chunk after chunk, which draws what one draw over all examples would."""
    rng_u, rng_g = np.random.default_rng(seed), np.random.default_rng(seed)
    names = ("simaou", "uniform", "gaussian", "icl_ft", "icl_zsl", "delta")
    acc, moved = {k: M.RunningMean() for k in names}, 0
    for a in range(0, N, METRICS_CHUNK):
        oz, oi, of = ([o.obs[j] for j in range(a, min(a + METRICS_CHUNK, N))] for o in observers)
        Hz, Hi, Hf = (np.stack([x.h for x in c]) for c in (oz, oi, of))  # (n, L, d_model), as captured (fp32)
        moved += int(np.any(Hf != Hz, axis=(1, 2)).sum())
        Hz, Hi, Hf = _f64(Hz), _f64(Hi), _f64(Hf)
        acc["simaou"].add(RUN["simaou"](Hz, Hi, Hf))
        acc["uniform"].add(RUN["simaou_random_uniform"](Hz, Hi, rng_u, "uniform"))
        acc["gaussian"].add(RUN["simaou_random_gaussian"](Hz, Hi, rng_g, "gaussian"))
        Sz, Si, Sf = ([_f64(x.simam_scores(segment)) for x in c] for c in (oz, oi, of))
        acc["icl_ft"].add(RUN["simam_ft"](Si, Sf))
        acc["icl_zsl"].add(RUN["simam_zsl"](Si, Sz))
        acc["delta"].add(RUN["simam_delta"](Sz, Si, Sf))
    return {"simaou": {**_stats_running(acc["simaou"]),
                       "baseline_uniform": _stats_running(acc["uniform"], False),
                       "baseline_gaussian": _stats_running(acc["gaussian"], False)},
            "simam": {"icl_ft": _stats_running(acc["icl_ft"], False), "icl_zsl": _stats_running(acc["icl_zsl"], False),
                      "delta": _stats_running(acc["delta"]), "segment": segment}}, moved


def _kendall(icl: Prompts, obs_i: Observer, obs_f: Observer, ft: FTRecord, nk: int, seed: int, scale: str) -> dict:
    """ICL attention over the demonstration tokens vs FT attention over the same (training) tokens, for the
    first ``nk`` test examples: token and example level, FT keyed by q·q (official; ``scale`` "paper": the
    official code's scale²·q·q) and by scale·q·k (dual form)."""
    Q, K = ft.train_queries(), ft.train_keys()  # (L, T_train, H or H_kv, hd)
    if Q.shape[1] != sum(b - a for a, b in icl.demo_spans):
        raise AssertionError("training tokens and demonstration tokens are misaligned")
    K = repeat_kv(K, Q.shape[2] // K.shape[2], dim=2)
    lengths = [b - a for a, b in icl.demo_spans]
    spans = list(zip(np.cumsum([0] + lengths[:-1]), np.cumsum(lengths)))
    sc = obs_f.obs[0].scale
    per_demo = lambda xs: [M.sum_per_span(x, spans) for x in xs]  # noqa: E731
    # per chunk of examples (the random vectors drawn example after example, as over all at once), running means
    rng_tok, rng_ex = np.random.default_rng(seed), np.random.default_rng(seed)
    names = ("token_qq", "token_qk", "example_qq", "example_qq_unscaled", "example_qk", "random_token",
             "random_example")
    acc = {k: M.RunningMean() for k in names}
    for a in range(0, nk, METRICS_CHUNK):
        js = range(a, min(a + METRICS_CHUNK, nk))
        icl_tok = [M.softmax(_f64(obs_i.obs[j].s_demo)) for j in js]
        q_test = np.stack([_f64(obs_f.obs[j].q) for j in js])  # (n, L, H, hd)
        ft_qq = list(M.softmax(M.ft_query_logits(q_test, Q, sc, scale == "paper")))  # one product per layer
        ft_qq_unscaled = list(M.softmax(M.ft_query_logits(q_test, Q, sc, False)))
        # the dual-form variant: the attention logits scale · q·k of the test query on the training keys
        ft_qk = list(M.softmax(sc * M.query_logits(q_test, K)))
        icl_ex = per_demo(icl_tok)
        acc["token_qq"].add(RUN["kendall_token"](icl_tok, ft_qq))
        acc["token_qk"].add(RUN["kendall_token_keys"](icl_tok, ft_qk))
        acc["example_qq"].add(RUN["kendall_example"](icl_ex, per_demo(ft_qq)))
        acc["example_qq_unscaled"].add(RUN["kendall_example_unscaled"](icl_ex, per_demo(ft_qq_unscaled)))
        acc["example_qk"].add(RUN["kendall_example_keys"](icl_ex, per_demo(ft_qk)))
        acc["random_token"].add(RUN["kendall_random"](icl_tok, [rng_tok.random(x.shape) for x in icl_tok]))
        acc["random_example"].add(RUN["kendall_random_example"](icl_ex, [rng_ex.random(x.shape) for x in icl_ex]))
    return {**{k: _stats_running(acc[k]) for k in names}, "n_examples": nk,
            "ft_logits": "scale^2 * q.q (paper)" if scale == "paper" else "q.q (unscaled)"}


def _updates_from(obs_z: Observer, obs_i: Observer, obs_f: Observer, demo_span: tuple[int, int], n: int, seed: int
                  ) -> dict | None:
    """:func:`_updates` on the first ``n`` test examples, from the keys and values the three passes captured: ΔW_ICL
    (Eq. 7) over the ICL prefix's ``demo_span``, W_ZSL (Eq. 6) of each ZSL prompt (start token and test input)
    before FT (ZSL pass) and after (FT pass). None when ``n`` is 0."""
    import torch

    if not n:
        return None
    t = torch.from_numpy
    dW_icl = torch.stack([dual.kv_outer(t(k[:, slice(*demo_span)]), t(v[:, slice(*demo_span)]))
                          for k, v in obs_i.prefix_kv])  # (L, H_kv, d, d)

    def w_prefix(obs: Observer) -> torch.Tensor:  # the start token's part of W_ZSL, (L, H_kv, d, d)
        return torch.stack([dual.kv_outer(t(k), t(v)) for k, v in obs.prefix_kv])

    wz, wf = w_prefix(obs_z), w_prefix(obs_f)

    def w_zsl(obs: Observer, w_p: torch.Tensor, j: int) -> torch.Tensor:  # Σ over the prompt's tokens of v kᵀ
        k, v = obs.obs[j].kv  # (L, H_kv, T_row, hd) each
        return w_p + dual.kv_outer(t(k), t(v))  # (L, H_kv, d, d), every layer at once

    dW_ft = (w_zsl(obs_f, wf, j) - w_zsl(obs_z, wz, j) for j in range(n))  # Eq. 8, one example at a time
    return _updates(dW_icl, dW_ft, [_f64(obs_i.obs[j].q) for j in range(n)], seed)


def _updates(dW_icl: "torch.Tensor", dW_ft, q_icl, seed: int) -> dict:
    """ΔW_ICL (Eq. 7, (L, H_kv, d, d)) against ΔW_FT = W_ZSL(after FT) − W_ZSL(before) (Eq. 8) on each test example's
    ZSL prompt (``dW_ft`` yields them per example, (L, H_kv, d, d)), per layer and head
    (:func:`iclgd.engine.dual.update_stats`, every layer in one call), with the random-update baseline (seeded by the
    run seed). Cosines: mean over the examples where ΔW_FT ≠ 0; norm ratio: median over examples."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n, L = len(q_icl), len(dW_icl)
    keys = ("cos_dW", "norm_ratio_ft_over_icl", "cos_effect_on_q", "cos_dW_random", "cos_effect_random")
    acc = {k: [] for k in keys}  # each (n, L, H)
    for j, dW_j in enumerate(dW_ft):
        st = dual.update_stats(dW_icl, dW_j, torch.from_numpy(q_icl[j]), g)
        for k in keys:
            acc[k].append(st[k].numpy())
    out = {"n_examples": n, "per_head": {}}
    for k in keys:
        a = np.asarray(acc[k])  # (n, L, H)
        if k == "norm_ratio_ft_over_icl":
            ph = np.median(a, axis=0)
            out[k] = _stats(np.median(a.transpose(1, 0, 2).reshape(L, -1), axis=1))
        else:
            ph = M.mean_defined(a, axis=0)[0]
            out[k] = _stats_ex(M.mean_defined(a, axis=2)[0])
        out["per_head"][k] = [[round(float(x), 6) for x in row] for row in ph]
    return out


def config_dict(cfg: CompareConfig) -> dict:
    d = asdict(cfg)
    d["lr_grid"] = list(d["lr_grid"])
    return d


@dataclass
class CompareJob:
    """What ``iclgd compare`` runs: every task × seed of one model, and its untrained control."""

    model: str | LoadedModel = O.model_field()  # a name or folder (loaded with dtype, device, bos), or a loaded model
    task: str = O.tasks_field()
    task_spec: Path | None = O.task_spec_field()
    seeds: list[int] = O.seeds_field(help="one seed or a comma list of distinct seeds, e.g. 1,2,3: mean and 95% "
                                          "bootstrap CI over seeds")
    n_test: int | None = O.n_test_field()
    untrained: bool = O.option(True, "the untrained-model control (the same model re-initialised per seed)")
    compare: CompareConfig = O.nested(CompareConfig)
    data_dir: Path | None = O.data_dir_field()
    dtype: str = O.dtype_field()
    device: str = O.device_field()
    bos: str | None = O.bos_field()  # the prompts' start token: None for the model's, or a token

    def __post_init__(self):
        O.validate(self)
        no_start_token(self.bos)
        if self.compare.untrained_seed is not None and not self.untrained:
            raise IclgdError("--untrained-seed applies to the untrained control only: drop --no-untrained")
        if self.compare.untrained_reinit != "blocks" and not self.untrained:
            raise IclgdError(f"--untrained-reinit {self.compare.untrained_reinit} applies to the untrained control "
                             "only: drop --no-untrained")


def no_start_token(bos: str | None) -> None:
    """Captures read the start token as the zero-shot context: the commands that take them need one."""
    if bos == "none":
        raise IclgdError("--bos none: only `iclgd eval` runs without a start token (compare, dual verify and "
                         "reproduce read it as the zero-shot context); give a token instead")


@dataclass
class TaskResult:
    """One task's outcome: ``doc`` is its results.json, ``records`` its records.jsonl."""

    doc: dict
    records: list[dict]
    subdir: str  # where it goes under --out: "" for a single task, else the task's name


UNTRAINED_RECIPE = ("attention and MLP weights ~ N(0, initializer_range^2), biases 0; embeddings, norms, "
                    "unembedding kept")
UNTRAINED_RECIPE_ALL = ("attention and MLP weights and the embeddings (input and output) ~ N(0, initializer_range^2), "
                        "biases 0; norms kept")


def run(job: CompareJob, progress: bool = True) -> Iterator[TaskResult]:
    """The tasks' results, one task at a time (so each can be written as it finishes). The options and the
    data are checked here, before any model is loaded; the models load when the first task is asked for."""
    datas, ddir = load_tasks(job.task, job.task_spec, job.data_dir, job.n_test)
    return _run(job, datas, ddir, progress)


def _run(job: CompareJob, datas: list[TaskData], ddir, progress: bool) -> Iterator[TaskResult]:
    lm = as_loaded(job.model, dtype=job.dtype, device=job.device, bos=job.bos)
    zsl_cache = ZslCache()  # the trained model's ZSL pass, once per task for all seeds
    control_lm = None
    if job.untrained:  # a second copy, re-initialised per seed (a model object given in Python is copied, not touched)
        control_lm = (copy.deepcopy(lm) if isinstance(job.model, LoadedModel)
                      else as_loaded(job.model, dtype=job.dtype, device=job.device, bos=job.bos))
    for data in datas:
        t0 = time.time()
        results, records, phases = [], [], []
        for s in job.seeds:
            r, rec, ph = compare_seed(lm, data, job.compare, s, progress, zsl_cache)
            results.append(r), records.extend({"condition": "trained", **x} for x in rec), phases.append(ph)
        control = None
        if control_lm is not None:
            control = []
            for s in job.seeds:  # the init seed follows the run seed, so the control's CI includes init variance
                init_seed = s if job.compare.untrained_seed is None else job.compare.untrained_seed
                reinit_untrained(control_lm, seed=init_seed, what=job.compare.untrained_reinit)
                c, crec, _ = compare_seed(control_lm, data, job.compare, s, progress, label="untrained")
                control.append({**c, "untrained_init_seed": init_seed})
                records.extend({"condition": "untrained", **x} for x in crec)
        doc = {
            "kind": "iclgd.compare",
            "config": {"model": model_name(job.model), "model_source": lm.source, "model_type": lm.model_type,
                       "dtype": lm.dtype, "device": lm.device, "start_token": lm.start, "task": data.spec.to_dict(), "seeds": job.seeds, "n_test": job.n_test,
                       "data_dir": str(ddir) if ddir else "hf-hub", **config_dict(job.compare),
                       "untrained_control": job.untrained,
                       "batch_size_applied": resolve_batch_size(lm, job.compare.batch_size),
                       "untrained_recipe": _recipe(job) if job.untrained else None},
            "versions": run_versions(),
            "data_sha256": data.files,
            "deviations": lm.start_deviations() + data.deviations + compare_deviations(job.compare),
            "seeds": results,
            "aggregate": M.aggregate(results),
            "untrained": {"seeds": control, "aggregate": M.aggregate(control)} if control else None,
            "warnings": [w for r in results for w in one_class_warnings(
                r["pred_counts"], f"task {data.spec.name}, seed {r['seed']}", data.spec.label_words)]
            + [w for r in results for w in r.get("prompt_warnings", [])],
            "timing": {"phases_s": phases, "wall_s": round(time.time() - t0, 1)},
        }
        yield TaskResult(doc, records, "" if len(datas) == 1 else data.spec.name)


def _recipe(job: CompareJob) -> str:
    """How the untrained control was made: what was re-initialised, and with which seed."""
    base = UNTRAINED_RECIPE_ALL if job.compare.untrained_reinit == "all" else UNTRAINED_RECIPE
    seed = ("= the run seed" if job.compare.untrained_seed is None
            else f"{job.compare.untrained_seed} for every run seed")
    return f"{base}; init seed {seed}"


def write(result: TaskResult, out) -> Path:
    """results.json and records.jsonl of one task, atomically; returns the results.json path."""
    d = Path(out) / result.subdir
    atomic_write_json(d / "results.json", result.doc)
    atomic_write_jsonl(d / "records.jsonl", result.records)
    return d / "results.json"


class CompareResult(Result):
    """``iclgd compare``'s files: per task a results.json (every seed's metrics, their aggregate, the untrained
    control) and its records.jsonl (one row per test example and seed)."""

    kind = "iclgd.compare"

    @classmethod
    def of(cls, tasks: list[TaskResult]) -> "CompareResult":
        docs = {str(Path(t.subdir) / "results.json"): t.doc for t in tasks}
        return cls(docs, {str(Path(t.subdir) / "records.jsonl"): t.records for t in tasks})

    def rows(self) -> list[dict]:
        out = []
        for doc in self.docs.values():
            task = doc["config"]["task"]["name"]
            control = (doc.get("untrained") or {}).get("seeds") or []
            for condition, seeds in (("trained", doc["seeds"]), ("untrained", control)):
                for r in seeds:
                    out += tidy_rows(self.numbers(r), {"task": task, "seed": r["seed"], "condition": condition})
        return out

    def numbers(self, r: dict) -> dict:
        """What of one seed's result becomes tidy rows."""
        return {k: v for k, v in r.items() if k not in ("seed", "untrained_init_seed")}


def run_in(job: CompareJob, out=None, overwrite: bool = False, progress: bool = True,
           each=None) -> CompareResult:
    """:func:`run`, each task written to ``out`` as it finishes (an earlier run's results are refused unless
    ``overwrite``); ``each(path)`` is called on every results.json written (the CLI draws its plots)."""
    tasks = []
    with writing(out, "compare", job, overwrite):
        for r in run(job, progress=progress):
            tasks.append(r)
            if out is not None:
                path = write(r, out)
                if each is not None:
                    each(path)
    return CompareResult.of(tasks)


# ----------------------------------------------------------------------------- as sweep units (iclgd reproduce)

def compare_unit(p: dict, models, data_dir, progress: bool) -> dict:
    from iclgd.core.tasks import load_task, resolve_data_dir, resolve_task
    from iclgd.engine.finetune import reinit_untrained

    data = load_task(resolve_task(p["task"]), resolve_data_dir(data_dir), p["n_test"])
    lm = models.get("untrained" if p["untrained"] else "trained")
    cfg = CompareConfig(k=p["k"], batch_size=models.cfg.batch_size)
    if p["untrained"]:  # the control's init follows the run seed, so its CI includes init variance
        reinit_untrained(lm, seed=p["seed"])
    # the trained model's ZSL pass is shared by the seeds this process runs (the control changes every seed)
    result, _, phases = compare_seed(lm, data, cfg, p["seed"], progress, None if p["untrained"] else models.zsl,
                                     label="untrained" if p["untrained"] else "")
    if p["untrained"]:
        result["untrained_init_seed"] = p["seed"]
    return {"result": result, "data_sha256": data.files,
            "deviations": lm.start_deviations() + data.deviations + compare_deviations(cfg), "_timing": phases}


UNITS = (UnitKind("compare", compare_unit, cost=lambda p: 3 * (p.get("n_test") or 200)),)


EXPERIMENTS = (Experiment("compare", CompareJob, run_in, CompareResult, UNITS),)
