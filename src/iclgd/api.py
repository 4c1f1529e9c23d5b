"""The Python API: the experiments of the CLI on a model object, a folder, a hub id or a registry name.

Every function here runs the same experiment code as its CLI command and returns a typed result whose
documents are the files the CLI writes (:class:`~iclgd.experiments.protocol.Result`: ``to_dict()``,
``to_pandas()``, ``save(dir)``, ``load(dir)``). Defaults are those of the CLI.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from iclgd.core.errors import IclgdError
from iclgd.core.models import LoadedModel, from_objects
from iclgd.core.models import load_model as _load_named
from iclgd.core.tasks import TaskSpec
from iclgd.experiments import compare as _compare
from iclgd.experiments import dual as _dual
from iclgd.experiments import eval as _eval
from iclgd.experiments import mechanisms as _mechanisms
from iclgd.experiments import momentum as _momentum
from iclgd.experiments import pretrain as _pretrain
from iclgd.experiments import sweep as _sweep
from iclgd.experiments import synthetic as _synthetic
from iclgd.experiments import world as _world
from iclgd.experiments.compare import CompareResult
from iclgd.experiments.dual import UpdatesResult, VerifyResult
from iclgd.experiments.eval import EvalResult
from iclgd.experiments.mechanisms import MechanismsResult
from iclgd.experiments.momentum import ApplyResult, MomentumResult
from iclgd.experiments.pretrain import PretrainResult
from iclgd.experiments.protocol import make
from iclgd.experiments.synthetic import SyntheticResult
from iclgd.experiments.world import WorldTrainResult


def load_model(model, tokenizer=None, *, name: str | None = None, dtype: str | None = None,
               device: str | None = None, bos: str | None = None) -> LoadedModel:
    """A model ready for every experiment: its attention layout derived from its modules and checked against its
    own attention (so captures, finetuning and the dual form can be trusted on it).

    ``model``: a Hugging Face causal LM object (give its ``tokenizer``), a :class:`LoadedModel` (returned as it
    is), or a name: a registry model (``smollm2-135m``, ``gemma3-270m``), ``tiny-random-*``, a local folder or a
    hub id (``gpt2``, ``owner/name``; downloaded unless ``HF_HUB_OFFLINE=1``). A name is loaded in ``dtype``
    (default float32) on ``device`` (default ``auto``: CUDA, then MPS, else the CPU); an object is moved to
    ``dtype``/``device`` only when they are given. A family whose layout cannot be derived still loads, for
    :func:`evaluate` only. ``bos``: the prompts' start token (default: the model's).
    """
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, (str, Path)):
        return _load_named(str(model), dtype=dtype or "float32", device=device or "auto", bos=bos,
                           need_layout=False)
    if dtype is not None or device is not None:
        from iclgd.core.models import _torch_dtype, resolve_device

        model.to(**({"dtype": _torch_dtype(dtype)} if dtype else {}),
                 **({"device": resolve_device(device)} if device else {}))
    return from_objects(model, tokenizer, name=name, bos=bos, need_layout=False)


def _loaded(model, tokenizer, need_layout: bool, what: str) -> LoadedModel | str:
    """A name stays a name (the experiment loads it, recording how); an object is wrapped."""
    if isinstance(model, (str, Path)):
        if tokenizer is not None:
            raise IclgdError("tokenizer: give it with a model object, not with a model name")
        return str(model)
    lm = load_model(model, tokenizer)
    if need_layout and lm.layout is None:
        raise IclgdError(f"model type {lm.model_type!r}: {what} needs its attention layout, which cannot be derived "
                         "(iclgd.evaluate works without one)")
    return lm


def _seeds(seeds) -> list[int]:
    return [int(seeds)] if isinstance(seeds, int) else [int(s) for s in seeds]


def evaluate(model, task: str | TaskSpec = "sst2", *, tokenizer=None, seeds: int | Sequence[int] = 1,
             progress: bool = False, **options) -> EvalResult:
    """ZSL and ICL accuracy (``iclgd eval``): ``task`` a name, a comma list, 'all' or a :class:`TaskSpec`;
    one ICL run per seed (ZSL once per task). Any causal LM, also of a family without an attention layout.

    ``options``: the fields of :class:`~iclgd.experiments.eval.EvalJob` and of its
    :class:`~iclgd.engine.scoring.EvalConfig` (``k``, ``n_test``, ``balanced``, ``separator``, ``max_len``,
    ``batch_size``, ``data_dir``, ``dtype``, ``device``, ``bos``), with the CLI's defaults."""
    job = make(_eval.EvalJob, "evaluate", model=_loaded(model, tokenizer, False, "evaluate"), task=task,
               seeds=_seeds(seeds), **options)
    return _eval.run_in(job, progress=progress)


def compare(model, task: str | TaskSpec = "sst2", *, tokenizer=None, seeds: int | Sequence[int] = 1,
            progress: bool = False, **options) -> CompareResult:
    """ZSL vs ICL vs K/V finetuning on the same demonstrations, with the paper's metrics (``iclgd compare``).

    ``options``: the fields of :class:`~iclgd.experiments.compare.CompareJob` and of its
    :class:`~iclgd.experiments.compare.CompareConfig` (``k``, ``n_test``, ``untrained``, ``lr``, ``lr_search``,
    ``ft_params``, ``ft_mode``, ``position``, ``kendall_n``, ``updates_n``, ``balanced``, ...), with the CLI's
    defaults: the untrained-model control runs unless ``untrained=False`` (a model object is copied for it, never
    changed)."""
    job = make(_compare.CompareJob, "compare", model=_loaded(model, tokenizer, True, "compare"), task=task,
               seeds=_seeds(seeds), **options)
    return _compare.run_in(job, progress=progress)


def mechanisms(model, task: str | TaskSpec = "sst2", *, tokenizer=None, seeds: int | Sequence[int] = 1,
               progress: bool = False, **options) -> MechanismsResult:
    """The rival accounts of ICL beside the implicit-GD metrics (``iclgd mechanisms``): task vector, function
    vector, induction heads, their link to ΔW_ICL, on compare's demonstrations and test rows, with the shuffled-label
    and untrained controls. ``options``: the fields of :class:`~iclgd.experiments.mechanisms.MechanismsJob`, its
    :class:`~iclgd.experiments.compare.CompareConfig` and :class:`~iclgd.experiments.mechanisms.MechanismsConfig`
    (``n_dev``, ``n_dummy``, ``n_cie``, ``fv_heads``, ``n_link``, ...)."""
    job = make(_mechanisms.MechanismsJob, "mechanisms", model=_loaded(model, tokenizer, True, "mechanisms"),
               task=task, seeds=_seeds(seeds), **options)
    return _mechanisms.run_in(job, progress=progress)


def dual_verify(model, task: str | TaskSpec = "sst2", *, tokenizer=None, seed: int = 1,
                layers: str | Sequence[int] = "all", **options) -> VerifyResult:
    """The dual form on every chosen layer and head (``iclgd dual verify``): ICL's attention output equals
    (W_ZSL + ΔW_ICL) q under linear attention, to 1e-5 in float64; with the softmax gap. The check runs in
    ``dtype`` (default float64); a model object is given its own dtype back afterwards. ``options``: the fields
    of :class:`~iclgd.experiments.dual.VerifyConfig` (``k``, ``dtype``, ``device``, ``data_dir``, ``bos``)."""
    layer_arg = layers if isinstance(layers, str) else ",".join(str(int(l)) for l in layers)
    cfg = make(_dual.VerifyConfig, "dual_verify", model=_loaded(model, tokenizer, True, "dual_verify"), task=task,
               seed=seed, layers=layer_arg, **options)
    return _dual.verify_in(cfg)


def compare_updates(before: str, after: str, **options) -> UpdatesResult:
    """ΔW_FT of a finetuned copy against ΔW_ICL, per layer and head (``iclgd dual compare-updates``); ``options``:
    the fields of :class:`~iclgd.experiments.dual.UpdatesConfig`."""
    return _dual.updates_in(make(_dual.UpdatesConfig, "compare_updates", before=before, after=after, **options))


def synthetic(*, seeds: int | Sequence[int] = 1, out=None, progress: bool = False, **options) -> SyntheticResult:
    """In-context linear regression (``iclgd synthetic``): a trained attention model against GD, GD++, OLS and
    ridge, and the metrics' calibration; ``options``: the fields of
    :class:`~iclgd.experiments.synthetic.SyntheticConfig` (``d``, ``n_ctx``, ``layers``, ``steps``, ...)."""
    job = make(_synthetic.SyntheticJob, "synthetic", seeds=_seeds(seeds), **options)
    return _synthetic.run_job(job, out, progress=progress)


def pretrain(out, *, overwrite: bool = False, progress: bool = False, **options) -> PretrainResult:
    """Train (or resume) a small LM from scratch into ``out`` (``iclgd pretrain``); ``options``: the fields of
    :class:`~iclgd.engine.train.TrainConfig` (``corpus``, ``attention``, ``eta``, ``size``, ``steps``, ``seed``,
    ...) and ``data_dir``."""
    return _pretrain.run(make(_pretrain.PretrainJob, "pretrain", **options), out, overwrite, progress)


def momentum_compare(out, *, overwrite: bool = False, progress: bool = False, **options) -> MomentumResult:
    """Vanilla and momentum LMs per seed, same init and data order (``iclgd momentum compare``); ``options``: the
    fields of :class:`~iclgd.experiments.momentum.MomentumConfig`."""
    return _momentum.run_job(make(_momentum.MomentumConfig, "momentum_compare", **options), out, overwrite, progress)


def momentum_apply(model: str = "smollm2-135m", **options) -> ApplyResult:
    """The EMA added to a pretrained model without training (``iclgd momentum apply``); ``options``: the fields of
    :class:`~iclgd.experiments.momentum.ApplyConfig`."""
    return _momentum.apply_job(make(_momentum.ApplyConfig, "momentum_apply", model=model, **options))


def world_train(out, *, progress: bool = False, **options) -> WorldTrainResult:
    """Train (or resume) an ICL-world model into ``out`` (``iclgd world train``); ``options``: the fields of
    :class:`~iclgd.experiments.world.WorldJob` (``size``, ``seed``, ``world_seed``, ``attention``, ``device``,
    ...)."""
    return _world.train_job(make(_world.WorldJob, "world_train", **options), out, progress=progress)


def reproduce(out, *, data_dir=None, shard: str | None = None, overwrite: bool = False, progress: bool = False,
              **options) -> str:
    """The paper's analyses as resumable units, then report.md (``iclgd reproduce``); ``options``: the fields of
    :class:`~iclgd.experiments.sweep.SweepConfig`. Returns what was done, in words."""
    return run_sweep(make(_sweep.SweepConfig, "reproduce", **options), Path(out), data_dir, shard, overwrite, progress)

def run_sweep(cfg, out: Path, data_dir=None, shard: str | None = None, overwrite: bool = False,
              progress: bool = True) -> str:
    """``iclgd reproduce``: this process's units of the sweep (:func:`iclgd.experiments.sweep.run`), then, when
    every unit is finished, report.md (one writer; a second process finding it fresh skips). Returns what was done,
    in words."""
    from iclgd.core.runfolder import lock
    from iclgd.experiments.sweep import check_units, run
    from iclgd.report import report_is_fresh, write_report

    r = run(cfg, out, data_dir, shard, overwrite, progress)
    done = (f"{r['ran']} units run by process {r['process']}, {r['skipped']} already finished, {r['elsewhere']} taken "
            f"by other processes (of {r['units']})")
    if r["unfinished"]:  # the process that finishes the last unit writes the report
        return (f"{done}; {len(r['unfinished'])} still running elsewhere, so no report yet (the last process to "
                f"finish writes it; or run `iclgd report {out}`)")
    with lock(out, "report", wait=True):
        check_units(out)
        fresh = report_is_fresh(out)
        report = out / "report.md" if fresh else write_report(out)
    return f"{done}; report: {report}" + (" (written by another process)" if fresh else "")


def regenerate(out: Path) -> Path:
    """``iclgd report DIR``: report.md and results.csv (and, for a reproduce folder, its plots) again, from the
    folder's result files alone. Any run folder: reproduce, or one command's ``--out`` (eval, compare, mechanisms,
    dual verify, dual compare-updates, synthetic, world train, pretrain, momentum)."""
    from iclgd.core import options
    from iclgd.core.errors import IclgdError
    from iclgd.core.runfolder import lock

    out = Path(out)
    if not out.is_dir():
        raise IclgdError(f"{out}: not a directory (expected a run folder)")
    options.out_dir(out, "report")
    if (out / "sweep.json").is_file():
        from iclgd.experiments.sweep import check_units
        from iclgd.report import write_report

        check_units(out)
        with lock(out, "report"):
            return write_report(out)
    from iclgd.experiments.protocol import experiments
    from iclgd.report.folder import write_folder_report

    found, seen = [], set()
    for e in experiments().values():
        if e.result in seen:
            continue
        seen.add(e.result)
        try:
            found.append((e.name, e.result.load(out)))
        except IclgdError:
            continue
    if not found:
        raise IclgdError(f"{out}: no iclgd results here (expected sweep.json, or the results.json, final.json, "
                         "dual_verify.json, dual_updates.json or momentum_apply.json a command writes with --out)")
    if len(found) > 1:
        raise IclgdError(f"{out}: holds the results of several commands ({', '.join(n for n, _ in found)}); "
                         "report one folder per run")
    name, res = found[0]
    try:
        table = res.to_pandas()
    except (KeyError, TypeError, ValueError, IndexError) as e:
        files = ", ".join(str(out / n) for n in res.docs)
        raise IclgdError(f"{files}: not a complete {name} result ({type(e).__name__}: {e}); "
                         f"expected the file as `iclgd {name} --out` writes it") from None
    with lock(out, "report"):
        return write_folder_report(out, name, res.docs, table)


__all__ = ["load_model", "evaluate", "compare", "dual_verify", "compare_updates", "synthetic", "pretrain",
           "momentum_compare", "momentum_apply", "world_train", "reproduce", "regenerate", "EvalResult",
           "CompareResult", "VerifyResult", "UpdatesResult", "SyntheticResult", "PretrainResult", "MomentumResult",
           "ApplyResult", "WorldTrainResult", "LoadedModel", "TaskSpec"]
