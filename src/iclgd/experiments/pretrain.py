"""``iclgd pretrain``: one small Llama-style LM trained from scratch (vanilla or momentum attention), resumable.

The training loop is :func:`iclgd.engine.train.pretrain`; this module is its configuration, run folder and result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from iclgd.core import options as O
from iclgd.engine.train import TrainConfig, check_run_folder, pretrain
from iclgd.experiments.protocol import Experiment, Result


@dataclass
class PretrainJob:
    """``iclgd pretrain``: the training configuration and where the corpora are."""

    train: TrainConfig = O.nested(TrainConfig)
    data_dir: Path | None = O.data_dir_field("data directory holding the corpora")

    def __post_init__(self):
        O.validate(self)


class PretrainResult(Result):
    """A pretraining run's final.json: the configuration, the final losses and the validation curve."""

    kind = "iclgd.pretrain"
    doc_name = "final.json"

    def rows(self) -> list[dict]:
        doc = next(iter(self.docs.values()))
        base = {"task": doc.get("config", {}).get("corpus"), "seed": doc.get("config", {}).get("seed"),
                "condition": doc.get("config", {}).get("attention"), "layer": None}
        return [{**base, "metric": k, "value": float(v)} for k, v in doc.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)]


def run(job: PretrainJob, out, overwrite: bool = False, progress: bool = True) -> PretrainResult:
    """Train (or resume) into ``out``, which refuses a run of another configuration unless ``overwrite``."""
    from dataclasses import asdict

    from iclgd.experiments.protocol import writing

    out = Path(out)
    with writing(out, "pretrain", asdict(job.train), overwrite, resumable=True):
        check_run_folder(job.train, out, job.data_dir, overwrite)
        doc = pretrain(job.train, out, job.data_dir, progress=progress)
    return PretrainResult({"final.json": doc})


EXPERIMENTS = (Experiment("pretrain", PretrainJob, run, PretrainResult),)
