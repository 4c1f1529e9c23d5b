"""What every experiment's result offers a Python user: the documents it wrote, as a dict, as a tidy table, on disk.

A result holds the same JSON documents the CLI writes (``results.json`` and friends), so a run from Python
and a run from the command line are the same files. :meth:`Result.to_pandas` flattens them into one row
per (task, seed, condition, layer, metric): a figure with ``overall`` and ``per_layer`` gives a row with
layer ``None`` (the mean over layers) and one per layer; any other number gives one row with layer
``None``. Lists that are not per layer (per-head tables, demonstration ids, losses) stay in the documents.
"""

from __future__ import annotations

import functools
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from iclgd.core.errors import IclgdError
from iclgd.core.io import TIDY_COLUMNS, atomic_write_json, atomic_write_jsonl, read_result, restore, tidy_frame
from iclgd.core.runfolder import run_folder

@dataclass(frozen=True)
class UnitKind:
    """A kind of ``iclgd reproduce`` unit, declared by the experiment that computes it: ``run(params, models,
    data_dir, progress)`` returns the unit's result fields (``_timing`` apart); ``cost(params)`` orders the queue
    longest first (it never changes a result). The report reads a unit's result by its kind (report/)."""

    name: str
    run: Any
    cost: Any = None


@dataclass(frozen=True)
class Experiment:
    """One experiment, as every front end sees it: the CLI command ``name`` (its options generated from the fields
    of ``config``), the Python function (``iclgd.<fn>``), the sweep's unit kinds and the result files.

    ``run(config, out=None, overwrite=False, progress=True) -> result``: the model (for the experiments that take
    one) is a field of the config: a Hugging Face model object wrapped by ``iclgd.load_model``, a loaded model or
    a name. With ``out`` the result's files are written there under the folder's lock; an earlier run's files are
    refused unless ``overwrite``."""

    name: str
    config: type
    run: Any
    result: type
    units: tuple = ()


MODULES = ("eval", "compare", "mechanisms", "dual", "synthetic", "momentum", "pretrain", "world")  # one module per experiment family


def experiments() -> dict[str, Experiment]:
    """Every experiment, by command name, as its module declares it (``EXPERIMENTS``); imported on first use."""
    import importlib

    return {e.name: e for m in MODULES for e in importlib.import_module(f"iclgd.experiments.{m}").EXPERIMENTS}


COUNTS = ("n_layers", "n_examples_per_layer", "n_examples")  # what a figure rests on: in the documents, not rows


def tidy_rows(obj: Any, base: dict, prefix: str = "") -> list[dict]:
    """The numbers of ``obj`` (a nested dict) as tidy rows, each carrying ``base`` (task, seed, condition)."""
    rows: list[dict] = []
    if isinstance(obj, dict) and "overall" in obj and "per_layer" in obj:
        rows.append({**base, "layer": None, "metric": prefix, "value": _num(obj["overall"])})
        rows += [{**base, "layer": l, "metric": prefix, "value": _num(v)} for l, v in enumerate(obj["per_layer"])]
        for k, v in obj.items():  # baselines beside the figure
            if k not in ("overall", "per_layer") and k not in COUNTS:
                rows += tidy_rows(v, base, f"{prefix}.{k}")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if k not in COUNTS:
                rows += tidy_rows(v, base, f"{prefix}.{k}" if prefix else k)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and prefix:
        rows.append({**base, "layer": None, "metric": prefix, "value": _num(obj)})
    return rows


@functools.cache
def _registry_baselines() -> dict[str, str]:
    """Tidy metric name -> its baseline's, from the metric registry (a path's trailing "overall" is the figure)."""
    from iclgd.core.metrics import METRICS

    name = lambda m: ".".join(p for p in METRICS[m].path if p != "overall")  # noqa: E731
    return {name(m): name(METRICS[m].baselines[0]) for m in METRICS if METRICS[m].baselines}


def _num(v) -> float:
    return float("nan") if v is None else float(v)


@contextmanager
def writing(out, command: str, config, overwrite: bool, resumable: bool = False):
    """The block that computes and writes a run of ``command`` into ``out`` (nothing when ``out`` is None), through
    the one run-folder guard (:func:`iclgd.core.runfolder.run_folder`): a folder holding another command's or
    another configuration's files, or an earlier run's results, is refused before any work unless ``overwrite``
    (which removes what the earlier run wrote); the configuration is recorded and the folder's lock held."""
    with run_folder(out, command, config, overwrite, resumable):
        yield


@dataclass
class Result:
    """One experiment's result: ``docs`` maps each file name under the run folder (``results.json``,
    ``sst2/results.json``) to its JSON document, ``records`` each per-example file to its rows."""

    docs: dict[str, dict]
    records: dict[str, list[dict]] = field(default_factory=dict)
    kind: ClassVar[str] = ""  # the documents' "kind"
    doc_name: ClassVar[str] = "results.json"  # the file name of a document under the run folder

    def to_dict(self) -> dict:
        """The documents as written: one document when there is one, else {file name: document}."""
        return next(iter(self.docs.values())) if len(self.docs) == 1 else dict(self.docs)

    def rows(self) -> list[dict]:  # pragma: no cover - each experiment says how its documents flatten
        raise NotImplementedError

    @staticmethod
    def baseline_of(metric: str, condition) -> tuple[str, object] | None:
        """The (metric, condition) of the row that is ``metric``'s baseline on the same task, seed and layer: a
        registry metric's first control (:data:`iclgd.core.metrics.METRICS`), the majority class for an accuracy,
        the random-update cosine for the task vector's link; None: no baseline."""
        registry = _registry_baselines()
        if metric in registry:
            return registry[metric], condition
        if metric.startswith("acc.") and metric != "acc.majority":
            return "acc.majority", condition
        if metric == "link.cos_effect_dw_q":
            return "link.cos_random", condition
        return None

    def to_pandas(self):
        """A tidy table: one row per task, seed, condition, layer and metric (columns :data:`TIDY_COLUMNS`)."""
        rows = self.rows()
        value = {(r["task"], r["seed"], r["condition"], r["layer"], r["metric"]): r["value"] for r in rows}
        for r in rows:
            b = self.baseline_of(r["metric"], r["condition"])
            r["baseline"] = None if b is None else value.get((r["task"], r["seed"], b[1], r["layer"], b[0]))
        return tidy_frame(rows)

    def save(self, out, overwrite: bool = False) -> Path:
        """Write the documents (atomically, under the folder's lock); an earlier run's files are kept unless
        ``overwrite``. Returns the folder."""
        out = Path(out)
        command = next((e.name for e in experiments().values() if e.result is type(self)), self.kind)
        with writing(out, command, {n: d.get("config") for n, d in self.docs.items()}, overwrite):
            self.write(out)
        return out

    def write(self, out: Path) -> None:
        for name, doc in self.docs.items():
            atomic_write_json(out / name, doc)
        for name, rows in self.records.items():
            atomic_write_jsonl(out / name, rows)

    @classmethod
    def load(cls, out) -> "Result":
        """The result saved in ``out`` (by :meth:`save` or by the CLI)."""
        out = Path(out)
        docs = {str(p.relative_to(out)): read_result(p) for p in sorted(out.rglob(cls.doc_name))}
        docs = {k: v for k, v in docs.items() if v.get("kind") == cls.kind}
        if not docs:
            raise IclgdError(f"{out}: no {cls.doc_name} of an {cls.kind} run")
        records = {}
        for name in docs:
            rec = out / Path(name).with_name("records.jsonl")
            if rec.is_file():
                records[str(rec.relative_to(out))] = [restore(json.loads(l)) for l in rec.read_text().splitlines() if l]
        return cls(docs, records)


def make(cls, what: str, **flat):
    """An experiment config ``cls`` from flat keyword options: the fields of ``cls`` and of the configs nested in it
    (as the CLI offers them), defaults from the dataclasses; an unknown name is a one-line error."""
    import dataclasses

    def names(c) -> set[str]:
        out = set()
        for f in dataclasses.fields(c):
            nested = f.metadata.get("iclgd", {}).get("nested")
            out |= names(f.default_factory) if nested else {f.name}
        return out

    unknown = sorted(set(flat) - names(cls))
    if unknown:
        raise IclgdError(f"{what}: unknown option(s) {', '.join(unknown)} (expected: {', '.join(sorted(names(cls)))})")

    def build(c):
        kw = {}
        for f in dataclasses.fields(c):
            if f.metadata.get("iclgd", {}).get("nested"):
                kw[f.name] = build(f.default_factory)
            elif f.name in flat:
                kw[f.name] = flat[f.name]
        return c(**kw)

    return build(cls)
