"""iclgd: in-context learning as implicit gradient descent (Dai et al. 2022), measured on your own models.

The Python API (the same experiments as the ``iclgd`` command line, on a model object)::

    import iclgd
    lm = iclgd.load_model(model, tokenizer)      # an HF causal LM object and its tokenizer; or a name, folder, hub id
    iclgd.evaluate(lm, task="sst2", k=8, seeds=[1], n_test=100)             # ZSL and ICL accuracy
    res = iclgd.compare(lm, task="sst2", k=8, seeds=[1, 2, 3], n_test=100, untrained=True)
    res.to_pandas()                              # tidy: task, seed, condition, layer, metric, value
    res.save("runs/x")                           # the files `iclgd compare --out runs/x` writes
    iclgd.dual_verify(lm, task="sst2", k=8)      # ICL = (W_ZSL + ΔW_ICL) q on every layer and head
    iclgd.metrics.simaou(...)                    # the paper's metrics as pure functions on arrays
    with iclgd.hooks.record(lm, ["attn_out.3"]) as rec:   # named hook points on the real model
        lm.model(input_ids=ids)
    iclgd.Task.from_json("my_task.json")         # a task spec (template, verbalizer, files) as an object

load_model(model, tokenizer=None, *, name, dtype, device, bos) -> LoadedModel
evaluate(model, task, *, seeds, **EvalJob/EvalConfig fields) -> EvalResult
compare(model, task, *, seeds, **CompareJob/CompareConfig fields) -> CompareResult   (untrained control on)
mechanisms(model, task, *, seeds, **MechanismsJob fields) -> MechanismsResult   (task/function vectors, induction)
dual_verify(model, task, *, seed, layers, **VerifyConfig fields) -> VerifyResult
compare_updates(before, after, **UpdatesConfig fields) -> UpdatesResult
synthetic(*, seeds, out, **SyntheticConfig fields) -> SyntheticResult
pretrain(out, **TrainConfig fields) -> PretrainResult; world_train(out, **WorldJob fields) -> WorldTrainResult
momentum_compare(out, **MomentumConfig fields) -> MomentumResult; momentum_apply(model, ...) -> ApplyResult
reproduce(out, **SweepConfig fields) -> str (the sweep, then report.md)
Every option's default, check and help text lives in its config dataclass, from which the CLI is generated.
Each result: .to_dict(), .to_pandas(), .save(dir), ResultClass.load(dir).
Names load online by default (hub ids download); HF_HUB_OFFLINE=1 keeps everything local.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.2.0"

_API = ["load_model", "evaluate", "compare", "mechanisms", "dual_verify", "compare_updates", "synthetic", "pretrain",
        "momentum_compare", "momentum_apply", "world_train", "reproduce", "LoadedModel", "EvalResult", "CompareResult",
        "VerifyResult", "UpdatesResult", "MechanismsResult", "SyntheticResult", "PretrainResult", "MomentumResult",
        "ApplyResult", "WorldTrainResult"]
__all__ = [*_API, "Task", "metrics", "hooks", "IclgdError", "__version__"]

# loaded on first use, so that `iclgd --help` and `import iclgd` do not import torch
_LAZY = {**{name: "iclgd.api" for name in _API}, "IclgdError": "iclgd.core.errors"}

if TYPE_CHECKING:  # for type checkers and IDEs
    from iclgd import hooks, metrics
    from iclgd.api import (ApplyResult, CompareResult, EvalResult, LoadedModel, MechanismsResult, MomentumResult,
                           PretrainResult, SyntheticResult, UpdatesResult, VerifyResult, WorldTrainResult, compare,
                           compare_updates, dual_verify, evaluate, load_model, mechanisms, momentum_apply,
                           momentum_compare, pretrain, reproduce, synthetic, world_train)
    from iclgd.core.errors import IclgdError
    from iclgd.core.tasks import TaskSpec as Task


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name == "Task":
        from iclgd.core.tasks import TaskSpec as value
    elif name in ("metrics", "hooks"):
        value = importlib.import_module(f"iclgd.{name}")
    else:
        raise AttributeError(f"module 'iclgd' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
