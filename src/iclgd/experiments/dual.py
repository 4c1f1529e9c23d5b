"""``iclgd dual``: the dual form checked on a real model's layers, and ΔW_ICL against ΔW_FT.

The math lives in :mod:`iclgd.engine.dual`; this module picks the prompt, runs it, and writes the result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from iclgd.core import options as O
from iclgd.core.errors import IclgdError
from iclgd.core.models import LoadedModel, as_loaded, load_model, model_name, run_versions
from iclgd.core.tasks import load_task, resolve_data_dir, resolve_task, sample_demos
from iclgd.engine import dual
from iclgd.engine.scoring import build_prompts
from iclgd.experiments.protocol import Experiment, Result, UnitKind, writing

TOLERANCE = {torch.float64: 1e-5, torch.float32: 1e-3}


def icl_prompt(lm: LoadedModel, task: str, k: int, seed: int, data_dir=None, example: int = 0, task_spec=None
               ) -> tuple[list[int], tuple[int, int], dict]:
    """A real ICL prompt: k demonstrations (seeded) and the ``example``-th test input of the task
    (a built-in task name, or a user task's JSON spec file ``task_spec``)."""
    spec = resolve_task(task, task_spec)
    task = spec.name
    data = load_task(spec, resolve_data_dir(data_dir), n_test=example + 1)
    p = build_prompts(lm, spec, sample_demos(data.demo_pool, k, seed), data.eval_rows[example:])
    ids = p.prefix_ids + p.query_ids[0]
    meta = {"task": task, "start_token": lm.start, "k_requested": k, "k_true": p.k_true, "seed": seed, "example_idx": data.eval_rows[example].get("idx"),
            "n_tokens": len(ids), "demo_span": [1, len(p.prefix_ids)], "files": data.files}
    return ids, (1, len(p.prefix_ids)), meta


def parse_layers(value: str, n_layers: int) -> list[int]:
    if value == "all":
        return list(range(n_layers))
    try:
        layers = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise IclgdError(f"--layers {value!r}: expected 'all' or a comma list of layer numbers") from None
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad or not layers:
        raise IclgdError(f"--layers {value!r}: layers must lie in 0..{n_layers - 1}")
    return layers


def _layer_list(flag: str, value) -> None:
    """'all' or a comma list of integers (their range is checked against the model once it is loaded)."""
    if value == "all":
        return
    try:
        ok = bool([int(x) for x in str(value).split(",") if x.strip()])
    except ValueError:
        ok = False
    if not ok:
        raise IclgdError(f"{flag} {value!r}: expected 'all' or a comma list of layer numbers")


@dataclass
class VerifyConfig:
    """``iclgd dual verify``: the dual form on one real ICL prompt, on every chosen layer and head."""

    model: str | LoadedModel = O.model_field()  # a name or folder, or a loaded model (converted to dtype in place)
    task: str = O.tasks_field(help="task name (one: the check runs on one prompt)")
    task_spec: Path | None = O.option(None, "JSON spec of a user task (e.g. an ICL-world task) instead of --tasks",
                                      type=Path)
    k: int = O.k_field(8, 1, "demonstrations in the prompt (>= 1)")
    seed: int = O.option(1, "seed of the demonstration shuffle (one: the check runs on one prompt)", name="--seeds",
                         old="--seed", parse=O.one_int, check=O.a_seed, type=str)
    layers: str = O.option("all", "layer indices: 'all' or a comma list, e.g. 0,3", check=_layer_list)
    dtype: str = O.dtype_field("float64", ("float64", "float32"), "float64 (tolerance 1e-5) or float32 (1e-3)")
    device: str = O.device_field()  # where a model given by name is loaded
    data_dir: Path | None = O.data_dir_field()
    bos: str | None = O.bos_field()  # the prompt's start token (None: the model's)

    def __post_init__(self):
        O.validate(self)
        from iclgd.experiments.compare import no_start_token

        no_start_token(self.bos)


def verify_prompt(lm: LoadedModel, task: str, k: int, seed: int, data_dir=None,
                  layers: list[int] | None = None, task_spec=None) -> dict:
    """The dual-form check on one ICL prompt: per-head rows, the per-layer table and its summary."""
    ids, span, meta = icl_prompt(lm, task, k, seed, data_dir, task_spec=task_spec)
    rows = dual.verify_layers(lm, ids, span, layers)
    table = dual.per_layer(rows)
    return {"rows": rows, "per_layer": table, "summary": dual.summarize(rows, table),
            "meta": {k_: v for k_, v in meta.items() if k_ != "files"}, "data_sha256": meta["files"]}


def verify(cfg: VerifyConfig) -> dict:
    """``iclgd dual verify``: every chosen layer and head, with the tolerance of the dtype."""
    lm = as_loaded(cfg.model, bos=cfg.bos, device=cfg.device)
    torch_dtype, given = getattr(torch, cfg.dtype), lm.model.get_input_embeddings().weight.dtype
    chosen = parse_layers(cfg.layers, lm.n_layers)
    t0 = time.time()
    lm.model.to(torch_dtype)
    try:
        v = verify_prompt(lm, cfg.task, cfg.k, cfg.seed, cfg.data_dir, chosen, task_spec=cfg.task_spec)
    finally:  # a model handed in from Python gets its dtype back (exact: float64 holds every float32 and bf16 value)
        if isinstance(cfg.model, LoadedModel):
            lm.model.to(given)
    tol = TOLERANCE[torch_dtype]
    ok = all(r["identity_rel_err"] <= tol for r in v["rows"])
    # sliding-window layers (Gemma-2/3, Mistral): the prediction position sees, and W_ZSL + ΔW_ICL sums, only
    # the last W tokens there
    windows = {l: lm.window(l) for l in chosen if lm.window(l) is not None}
    return {"kind": "iclgd.dual.verify",
            "config": {"model": model_name(cfg.model), "model_source": lm.source, "dtype": cfg.dtype,
                       "device": lm.device, "layers": chosen,
                       **v["meta"], **({"sliding_windows": windows} if windows else {})},
            "data_sha256": v["data_sha256"], "versions": run_versions(),
            "summary": {**v["summary"], "tolerance": tol, "within_tolerance": ok},
            "per_layer": v["per_layer"], "rows": v["rows"], "timing": {"wall_s": round(time.time() - t0, 2)}}


def _as_option(flag: str, load, name):
    """``load(name)``, its errors naming ``flag`` (the option the user gave) rather than --model."""
    try:
        return load(name)
    except IclgdError as e:
        raise IclgdError(str(e).replace("--model", flag, 1)) from None


def load_after(before: str, after: str) -> LoadedModel:
    """A model folder, or a state dict applied on top of ``before``."""
    p = Path(after)
    if p.is_dir() or not p.exists():
        return _as_option("--after", load_model, after)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file is the user's to know about
        raise IclgdError(f"--after {p}: not a readable state dict ({type(e).__name__}; expected a .pt or "
                         ".safetensors file of tensors)") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise IclgdError(f"--after {p}: not a state dict (expected a mapping of parameter names to tensors)")
    lm = load_model(before)
    own = lm.model.state_dict()
    for key, v in sd.items():
        if key in own and own[key].shape != v.shape:
            raise IclgdError(f"--after {p}: tensor {key} has shape {tuple(v.shape)}, the model's is "
                             f"{tuple(own[key].shape)} (a state dict of another model?)")
    missing, unexpected = lm.model.load_state_dict(sd, strict=False)
    if unexpected:
        raise IclgdError(f"--after {p}: state dict has keys the model lacks, e.g. {unexpected[0]}")
    return lm


@dataclass
class UpdatesConfig:
    """``iclgd dual compare-updates``: ΔW_FT of a finetuned copy against ΔW_ICL on one ICL prompt."""

    before: str = O.option(..., "model (name or folder) before finetuning", type=str)
    after: str = O.option(..., "model folder after K/V finetuning, or a state-dict file (.pt/.safetensors)", type=str)
    task: str = O.tasks_field(help="task name (one: the comparison runs on one prompt)")
    k: int = O.k_field(8, 1, "demonstrations in the prompt (>= 1)")
    seed: int = O.option(1, "seed of the demonstration shuffle (one)", name="--seeds", old="--seed",
                         parse=O.one_int, check=O.a_seed, type=str)
    data_dir: Path | None = O.data_dir_field()

    def __post_init__(self):
        O.validate(self)


def same_architecture(before: LoadedModel, after: LoadedModel, flag_value) -> None:
    """ΔW_FT = W(after) − W(before) needs the same model before and after finetuning: the same parameters, each of
    the same shape (another architecture or tokenizer would give numbers that mean nothing)."""
    sb = {k: tuple(v.shape) for k, v in before.model.state_dict().items()}
    sa = {k: tuple(v.shape) for k, v in after.model.state_dict().items()}
    diff = sorted(k for k in set(sb) | set(sa) if sb.get(k) != sa.get(k))
    if diff:
        k = diff[0]
        raise IclgdError(f"--after {flag_value}: not the --before model finetuned (another architecture: parameter "
                         f"{k} is {sa.get(k, 'absent')} after, {sb.get(k, 'absent')} before; {len(diff)} differ)")


def compare_updates(before: str, after: str, task: str = "sst2", k: int = 8, seed: int = 1, data_dir=None) -> dict:
    """``iclgd dual compare-updates``: ΔW_FT = W_ZSL(after) − W_ZSL(before) vs ΔW_ICL, per layer and head."""
    lm_b = _as_option("--before", load_model, before)
    lm_a = load_after(before, after)
    same_architecture(lm_b, lm_a, after)
    ids, span, meta = icl_prompt(lm_b, task, k, seed, data_dir)
    rows = dual.compare_updates(lm_b, lm_a, ids, span)
    return {"kind": "iclgd.dual.compare_updates", "config": {"before": before, "after": after, **meta},
            "versions": run_versions(), "rows": rows}


class VerifyResult(Result):
    """``iclgd dual verify``'s dual_verify.json: per layer the identity error, the reconstruction error,
    ‖ΔW_ICL‖/‖W_ZSL‖ and the softmax gap; per head in ``rows``; the summary with its tolerance."""

    kind = "iclgd.dual.verify"
    doc_name = "dual_verify.json"

    @property
    def doc(self) -> dict:
        return self.docs["dual_verify.json"]

    @property
    def ok(self) -> bool:
        """The identity holds on every layer and head within the dtype's tolerance."""
        return bool(self.doc["summary"]["within_tolerance"])

    def rows(self) -> list[dict]:
        c = self.doc["config"]
        base = {"task": c["task"], "seed": c["seed"], "condition": "icl"}
        return [{**base, "layer": row["layer"], "metric": k, "value": float(v)}
                for row in self.doc["per_layer"] for k, v in row.items() if k != "layer"]


class UpdatesResult(Result):
    """``iclgd dual compare-updates``'s dual_updates.json: per layer and head, the cosine of ΔW_FT with ΔW_ICL,
    their norm ratio and the cosine of their effects on the query."""

    kind = "iclgd.dual.compare_updates"
    doc_name = "dual_updates.json"

    def rows(self) -> list[dict]:
        doc = next(iter(self.docs.values()))
        task = doc["config"].get("task")
        return [{"task": task, "seed": doc["config"].get("seed"), "condition": f"head {r.get('head')}",
                 "layer": r["layer"], "metric": k, "value": float(v)}
                for r in doc["rows"] for k, v in r.items() if k not in ("layer", "head") and isinstance(v, (int, float))]


def _guarded(out, name: str, command: str, config, overwrite: bool, compute, result_cls):
    """``compute()``'s document as a ``result_cls``, written to ``out/name`` when ``out`` is given."""
    with writing(out, command, config, overwrite):
        res = result_cls({name: compute()})
        if out is not None:
            res.write(Path(out))
    return res


def verify_in(cfg: VerifyConfig, out=None, overwrite: bool = False, progress: bool = True) -> VerifyResult:
    """:func:`verify`, written to ``out/dual_verify.json`` when given (under the folder's lock)."""
    return _guarded(out, "dual_verify.json", "dual verify", cfg, overwrite, lambda: verify(cfg), VerifyResult)


def updates_in(cfg: UpdatesConfig, out=None, overwrite: bool = False, progress: bool = True) -> UpdatesResult:
    """:func:`compare_updates`, written to ``out/dual_updates.json`` when given (under the folder's lock)."""
    return _guarded(out, "dual_updates.json", "dual compare-updates", cfg, overwrite,
                    lambda: compare_updates(cfg.before, cfg.after, cfg.task, cfg.k, cfg.seed, cfg.data_dir),
                    UpdatesResult)


# ----------------------------------------------------------------------------- as sweep units (iclgd reproduce)

def dual_unit(p: dict, models, data_dir, progress: bool) -> dict:
    v = verify_prompt(models.get("dual"), p["task"], p["k"], p["seed"], data_dir)
    return {key: v[key] for key in ("per_layer", "meta", "data_sha256", "summary")}


UNITS = (UnitKind("dual", dual_unit, cost=lambda p: 5),)


EXPERIMENTS = (Experiment("dual verify", VerifyConfig, verify_in, VerifyResult, UNITS),
               Experiment("dual compare-updates", UpdatesConfig, updates_in, UpdatesResult))
