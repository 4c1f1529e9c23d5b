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
from iclgd.core.options import seed_list as _check_seeds
from iclgd.core.tasks import TaskSpec
from iclgd.engine.scoring import EvalConfig
from iclgd.experiments import compare as _compare
from iclgd.experiments import dual as _dual
from iclgd.experiments import eval as _eval
from iclgd.experiments.compare import CompareResult
from iclgd.experiments.dual import VerifyResult
from iclgd.experiments.eval import EvalResult


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


def _seeds(seeds: int | Sequence[int]) -> list[int]:
    out = [int(seeds)] if isinstance(seeds, int) else [int(s) for s in seeds]
    if not out:
        raise IclgdError("seeds: expected one seed or a list of distinct seeds")
    _check_seeds("seeds", out)
    return out


def evaluate(model, task: str | TaskSpec = "sst2", *, tokenizer=None, k: int = 32, seeds: int | Sequence[int] = 1,
             n_test: int | None = None, balanced: bool = False, separator: str = "\n", max_len: int = 2048,
             batch_size: int | str = "auto", data_dir=None, dtype: str = "float32", device: str = "auto",
             bos: str | None = None, progress: bool = False) -> EvalResult:
    """ZSL and ICL accuracy (``iclgd eval``): ``task`` a name, a comma list, 'all' or a :class:`TaskSpec`;
    one ICL run per seed (ZSL once per task). Any causal LM, also of a family without an attention layout."""
    s = _seeds(seeds)
    job = _eval.EvalJob(model=_loaded(model, tokenizer, False, "evaluate"), task=task, n_test=n_test,
                        data_dir=data_dir, dtype=dtype, device=device, bos=bos, seeds=s,
                        eval=EvalConfig(k=k, seed=s[0], balanced=balanced, separator=separator, max_len=max_len,
                                        batch_size=batch_size))
    return EvalResult({"results.json": _eval.run(job, progress=progress)})


def compare(model, task: str | TaskSpec = "sst2", *, tokenizer=None, k: int = 32, seeds: int | Sequence[int] = 1,
            n_test: int | None = None, untrained: bool = False, data_dir=None, dtype: str = "float32",
            device: str = "auto", bos: str | None = None, progress: bool = False, **options) -> CompareResult:
    """ZSL vs ICL vs K/V finetuning on the same demonstrations, with the paper's metrics (``iclgd compare``).

    ``options``: any field of :class:`~iclgd.experiments.compare.CompareConfig` (``lr``, ``lr_search``,
    ``ft_params``, ``ft_mode``, ``position``, ``kendall_n``, ``updates_n``, ``balanced``, ...).
    ``untrained=True`` adds the untrained-model control; a model object is copied for it, never changed.
    """
    unknown = sorted(set(options) - set(_compare.CompareConfig.__dataclass_fields__))
    if unknown:
        raise IclgdError(f"compare: unknown option(s) {', '.join(unknown)} (expected fields of CompareConfig: "
                         f"{', '.join(_compare.CompareConfig.__dataclass_fields__)})")
    job = _compare.CompareJob(model=_loaded(model, tokenizer, True, "compare"), task=task, seeds=_seeds(seeds),
                              n_test=n_test, untrained=untrained, data_dir=data_dir, dtype=dtype, device=device,
                              bos=bos, compare=_compare.CompareConfig(k=k, **options))
    return CompareResult.of(list(_compare.run(job, progress=progress)))


def dual_verify(model, task: str | TaskSpec = "sst2", *, tokenizer=None, k: int = 8, seed: int = 1,
                layers: str | Sequence[int] = "all", dtype: str = "float64", data_dir=None, device: str = "auto",
                bos: str | None = None) -> VerifyResult:
    """The dual form on every chosen layer and head (``iclgd dual verify``): ICL's attention output equals
    (W_ZSL + ΔW_ICL) q under linear attention, to 1e-5 in float64; with the softmax gap. The check runs in
    ``dtype``; a model object is given its own dtype back afterwards."""
    layer_arg = layers if isinstance(layers, str) else ",".join(str(int(l)) for l in layers)
    cfg = _dual.VerifyConfig(model=_loaded(model, tokenizer, True, "dual_verify"), task=task, k=k, seed=seed,
                             layers=layer_arg, dtype=dtype, data_dir=data_dir, bos=bos, device=device)
    return VerifyResult({"dual_verify.json": _dual.verify(cfg)})


__all__ = ["load_model", "evaluate", "compare", "dual_verify", "EvalResult", "CompareResult", "VerifyResult",
           "LoadedModel", "TaskSpec"]
