"""The six classification tasks of Dai et al. as declarative data, and their loading.

A :class:`TaskSpec` says everything the evaluation engine needs to know about a task (template,
label words, which data files hold demonstrations and test examples, the paper's finetuning rate,
what to do when a split is missing, how it deviates from the paper); the engine never special-cases
a task. The built-in tasks are JSON files in ``task_specs/``, read by the same :func:`load_task_spec`
as a user's ``--task-spec`` file: adding a task is adding a file. Data come from a data directory of
JSON Lines files (see ``../shared/data/README.md``), or, for users online, from the Hugging Face hub
through ``datasets``.
"""

from __future__ import annotations

import json
import os
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path

from typing import Annotated, Literal

import numpy as np
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError,
                      field_validator)

from iclgd.core.errors import IclgdError
from iclgd.core.schema import line_of, parse_json_text, schema_error

PROJECT_ROOT = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class HubSource:
    """Where the same task lives on the Hugging Face hub (used only when no data directory exists)."""

    path: str
    name: str | None
    demo_split: str
    eval_split: str
    columns: dict[str, str]  # our field name -> hub column name


@dataclass(frozen=True)
class TaskSpec:
    """A classification task: template, verbalizer and splits (template 0 of the paper's code)."""

    name: str
    template: str  # str.format template of the test input, e.g. "Sentence: {sentence} Label:"
    label_words: tuple[str, ...]  # verbalizer, indexed by the integer label
    fields: dict[str, str]  # template placeholder -> key in a JSONL row
    demo_file: str  # relative to the data directory
    eval_file: str
    answer_format: str = " {label}"  # what follows the template for a demonstration / an option
    eval_shuffle_seed: int = 1  # the paper shuffles the evaluation split with seed 1 ...
    eval_cap: int = 2000  # ... and keeps its first 2,000 examples
    hub: HubSource | None = None
    deviations: tuple[str, ...] = ()
    lr: float | None = None  # the paper's K/V finetuning rate for this task (None: iclgd's default)
    # when the data directory lacks the demo split: demonstrations come from the evaluation split past
    # its first ``eval_cap`` shuffled rows, recorded as this deviation (None: a missing split is an error)
    demo_fallback: str | None = None
    notes: tuple[str, ...] = ()  # how the local data relate to the paper's, for the report
    # demonstration rows whose text is an evaluation row's: "remove" them from the pool (recorded), or "keep" them
    # where inputs repeat by design (a finite item set drawn independently, as in the ICL world; recorded too)
    demo_overlap: str = "remove"

    def format_input(self, row: dict) -> str:
        return self.template.format(**{ph: row[key] for ph, key in self.fields.items()})

    def format_answer(self, label: int) -> str:
        return self.answer_format.format(label=self.label_words[label])

    def format_demo(self, row: dict) -> str:
        return self.format_input(row) + self.format_answer(row["label"])

    def to_dict(self) -> dict:
        """What defines the task's prompts and data (recorded in results files)."""
        return {k: v for k, v in asdict(self).items() if k not in ("lr", "demo_fallback", "notes", "demo_overlap")}

    @classmethod
    def from_json(cls, path: str | Path) -> "TaskSpec":
        """A user task from its JSON spec file (the ``--task-spec`` format; relative data paths from its folder)."""
        return load_task_spec(path)

    @classmethod
    def builtin(cls, name: str) -> "TaskSpec":
        """One of the paper's six tasks: sst2, sst5, mr, subj, agnews, cb."""
        return resolve_task(name)


def resolve_task(name: "str | TaskSpec", spec_file: "str | Path | TaskSpec | None" = None) -> TaskSpec:
    """A task by name, a spec file (``--task-spec``), or a :class:`TaskSpec` object as it is."""
    if isinstance(spec_file, TaskSpec):
        return spec_file
    if isinstance(name, TaskSpec):
        return name
    if spec_file is not None:
        return load_task_spec(spec_file)
    if isinstance(name, str) and "," in name and all(t.strip() in TASKS for t in name.split(",")):
        raise IclgdError(f"--task {name!r}: this command takes one task (run it once per task)")
    if name not in TASKS:
        raise IclgdError(f"--task {name!r}: unknown task (expected one of {', '.join(TASKS)}, or --task-spec FILE)")
    return TASKS[name]


def parse_task_list(value: str) -> list[str]:
    names = list(TASKS) if value == "all" else [t.strip() for t in value.split(",") if t.strip()]
    if not names:
        raise IclgdError("--task: empty task list (expected a task name, a comma list, or 'all')")
    dup = [n for i, n in enumerate(names) if n in names[:i]]
    if dup:
        raise IclgdError(f"--tasks {value!r}: task {dup[0]} appears twice (expected distinct tasks)")
    for n in names:
        resolve_task(n)
    return names


def load_task_spec(path: str | Path, builtin: bool = False) -> TaskSpec:
    """A task from a JSON file: name, template, label_words, demo_file, eval_file (required), and any
    other :class:`TaskSpec` field (``fields`` defaults to the template's placeholders).

    A user's relative data-file paths are taken relative to the spec file's folder; a built-in task's
    (``builtin``) relative to the data directory.
    """
    path = Path(path)
    if path.is_dir():
        raise IclgdError(f"--task-spec {path}: is a folder, expected a JSON task-spec file")
    if not path.is_file():
        raise IclgdError(f"--task-spec {path}: file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise IclgdError(f"{path}: not UTF-8 text (byte {e.start}); save the task spec as UTF-8") from None
    raw = parse_json_text(path, text)
    if not isinstance(raw, dict):
        raise IclgdError(f"{path}: a task spec is a JSON object, got a {type(raw).__name__}")
    required = ["name", "template", "label_words", "demo_file", "eval_file"]
    missing = [k for k in required if k not in raw]
    if missing:
        raise IclgdError(f"{path}: task spec lacks {', '.join(missing)} (expected keys {', '.join(required)})")
    placeholders = validate_spec(path, text, raw)
    fields = raw.get("fields") or {p: p for p in placeholders}
    for key in ("demo_file", "eval_file"):
        p = Path(raw[key])
        if not builtin:
            raw[key] = str(p if p.is_absolute() else (path.parent / p).resolve())
    allowed = {f.name for f in TaskSpec.__dataclass_fields__.values()}
    kwargs = {k: v for k, v in raw.items() if k in allowed}
    kwargs.update(label_words=tuple(raw["label_words"]), fields=fields,
                  hub=HubSource(**raw["hub"]) if raw.get("hub") else None,
                  deviations=tuple(raw.get("deviations", ())), notes=tuple(raw.get("notes", ())))
    return TaskSpec(**kwargs)


def _placeholders(fmt: str, where: str) -> list[str]:
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError as e:
        raise IclgdError(f"{where}: not a valid format string ({e}; write literal braces as {{{{ and }}}})") from None
    names = [f for _, f, _, _ in parsed if f is not None]
    bad = [f for f in names if not f.isidentifier()]
    if bad:
        raise IclgdError(f"{where}: placeholder {{{bad[0]}}} is not a name (expected e.g. {{sentence}})")
    return names


Text = Annotated[str, StringConstraints(pattern=r"\S")]  # a non-empty string (not only white space)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class HubSchema(_Strict):
    path: Text
    name: str | None = None
    demo_split: Text
    eval_split: Text
    columns: dict[str, str]


class TaskSpecSchema(_Strict):
    """The ``--task-spec`` file format (the built-in tasks are files of it too): types, finite numbers, and
    templates that render; keys starting with ``_`` are notes for people and ignored."""

    name: Text
    template: Text
    label_words: Annotated[list[Text], Field(min_length=2)]
    demo_file: Text
    eval_file: Text
    fields: dict[str, str] | None = None
    answer_format: Text = " {label}"
    eval_shuffle_seed: Annotated[int, Field(ge=0)] = 1
    eval_cap: Annotated[int, Field(ge=1)] = 2000
    hub: HubSchema | None = None
    deviations: list[str] = []
    lr: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    demo_fallback: str | None = None
    notes: list[str] = []
    demo_overlap: Literal["remove", "keep"] = "remove"

    @field_validator("label_words")
    @classmethod
    def _distinct(cls, words: list[str]) -> list[str]:
        dup = [w for i, w in enumerate(words) if w in words[:i]]
        if dup:
            raise ValueError(f"label word {dup[0]!r} appears twice (the labels could not be told apart)")
        return words


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"holds a lone surrogate (\\u{ord(text[e.start]):04x} at character {e.start}) that no "
                         "tokenizer can encode") from None
    return text


def validate_spec(path: Path, text: str, raw: dict) -> list[str]:
    """The spec against :class:`TaskSpecSchema`, then its templates rendered once on a probe row; returns the
    template's placeholders."""
    def where(key: str) -> str:
        return f"{path}:{line_of(text, key)}: field {key}"

    try:
        spec = TaskSpecSchema.model_validate({k: v for k, v in raw.items() if not str(k).startswith("_")})
    except ValidationError as e:
        raise schema_error(path, text, e, TaskSpecSchema.model_fields) from None
    for key, texts in (("name", [spec.name]), ("template", [spec.template]), ("answer_format", [spec.answer_format]),
                       ("label_words", spec.label_words)):
        for t in texts:  # what goes into a prompt must be text a tokenizer can encode
            try:
                _encodable(t)
            except ValueError as e:
                raise IclgdError(f"{where(key)}: {e}") from None
    placeholders = _placeholders(spec.template, where("template"))
    if not placeholders:
        raise IclgdError(f"{where('template')}: has no placeholder, so every prompt would be the same text "
                         "(expected e.g. \"Review: {sentence} Sentiment:\")")
    answer = _placeholders(spec.answer_format, where("answer_format"))
    if answer != ["label"]:
        raise IclgdError(f"{where('answer_format')}: expected exactly one placeholder {{label}}, e.g. \" {{label}}\"")
    if spec.fields and set(spec.fields) != set(placeholders):
        raise IclgdError(f"{where('fields')}: its keys {sorted(spec.fields)} differ from the template's placeholders "
                         f"{sorted(set(placeholders))}")
    for key, fmt, probe in (("template", spec.template, {p: "probe text" for p in placeholders}),
                            ("answer_format", spec.answer_format, {"label": spec.label_words[0]})):
        try:  # valid names can still fail when formatted: format specs, conversions, nested fields
            fmt.format(**probe)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise IclgdError(f"{where(key)}: fails when rendered on a probe row ({type(e).__name__}: {e}); use plain "
                             "placeholders such as {sentence}, without format specs or conversions") from None
    return placeholders


SPEC_DIR = Path(__file__).resolve().parent / "task_specs"
PAPER_ORDER = ("sst2", "sst5", "mr", "subj", "agnews", "cb")  # the paper's table; other built-ins follow by name


def builtin_tasks() -> dict[str, TaskSpec]:
    specs = {p.stem: load_task_spec(p, builtin=True) for p in sorted(SPEC_DIR.glob("*.json"))}
    order = [n for n in PAPER_ORDER if n in specs] + [n for n in specs if n not in PAPER_ORDER]
    return {n: specs[n] for n in order}


TASKS: dict[str, TaskSpec] = builtin_tasks()


# ----------------------------------------------------------------------------- data directory


def default_data_dir() -> Path | None:
    """``--data-dir`` else ``$ICLGD_DATA_DIR`` else ``../shared/data`` beside the project root."""
    env = os.environ.get("ICLGD_DATA_DIR")
    if env:
        return Path(env)
    for cand in (PROJECT_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if cand.is_dir():
            return cand
    return None


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The data directory to use, or None for the Hugging Face hub. A named one must exist."""
    if data_dir is not None:
        p = Path(data_dir)
        if p.exists() and not p.is_dir():
            raise IclgdError(f"--data-dir {p}: is a file, expected a directory")
        if not p.is_dir():
            raise IclgdError(f"--data-dir {p}: directory not found")
        return p
    p = default_data_dir()
    if p is not None and not p.is_dir():
        raise IclgdError(f"ICLGD_DATA_DIR={p}: directory not found")
    return p


@dataclass
class Split:
    """Rows of one data file, with where they came from."""

    rows: list[dict]
    source: str  # file path, or hub id
    sha256: str | None = None
    notes: list[str] = field(default_factory=list)


def row_schema(spec: TaskSpec) -> TypeAdapter:
    """A data row of ``spec``: each field the template reads a string of text a tokenizer can encode, and an integer
    label inside the verbalizer; other keys are kept and not checked."""
    from typing_extensions import TypedDict  # (pydantic needs this one before Python 3.12)

    text = Annotated[str, AfterValidator(_encodable)]
    label = Annotated[int, Field(ge=0, le=len(spec.label_words) - 1)]
    row = TypedDict("Row", {**{k: text for k in sorted(set(spec.fields.values()))}, "label": label})
    row.__pydantic_config__ = ConfigDict(strict=True)
    return TypeAdapter(row)


def _row_error(path: Path, lineno: int, row: dict, spec: TaskSpec, err: ValidationError) -> IclgdError:
    errors = err.errors()
    missing = sorted(str(e["loc"][0]) for e in errors if e["type"] == "missing")
    if missing:
        return IclgdError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
    e = errors[0]
    key = str(e["loc"][0])
    if key == "label" and (not isinstance(row["label"], int) or isinstance(row["label"], bool)):
        return IclgdError(f"{path}:{lineno}: label {json.dumps(row['label'])[:20]} is not an integer (expected 0.."
                          f"{len(spec.label_words) - 1} for {'/'.join(spec.label_words)})")
    if key == "label":
        return IclgdError(f"{path}:{lineno}: label {row['label']!r} is outside the verbalizer of task {spec.name} "
                          f"(expected an integer 0..{len(spec.label_words) - 1} for {'/'.join(spec.label_words)})")
    if e["type"] == "value_error":
        return IclgdError(f"{path}:{lineno}: field {key} {e['msg'].removeprefix('Value error, ')}")
    return IclgdError(f"{path}:{lineno}: field {key} is {json.dumps(row[key])[:30]}, expected a string of text")


def load_jsonl(path: Path, spec: TaskSpec) -> list[dict]:
    """Read and validate a JSONL file: every line an object with the task's fields and a valid label."""
    if path.is_dir():
        raise IclgdError(f"{path}: is a folder, expected a JSON Lines data file (task {spec.name})")
    if not path.is_file():
        raise IclgdError(f"{path}: data file not found (task {spec.name})")
    check_row = row_schema(spec)
    rows = []
    with open(path, "rb") as f:
        for lineno, raw_line in enumerate(f, 1):
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise IclgdError(f"{path}:{lineno}: not UTF-8 text (byte {e.start} of the line); save the data "
                                 "file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise IclgdError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
            if not isinstance(row, dict):
                raise IclgdError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            try:
                check_row.validate_python(row)
            except ValidationError as e:
                raise _row_error(path, lineno, row, spec, e) from None
            row.setdefault("idx", lineno - 1)
            rows.append(row)
    if not rows:
        raise IclgdError(f"{path}: data file is empty (task {spec.name})")
    return rows


def hub_dataset(what: str, *args, **kw):
    """``datasets.load_dataset(*args, **kw)``; a data set the hub does not give (offline, unknown, no access) is one
    line naming it and ``what`` asked for it."""
    import datasets

    try:
        return datasets.load_dataset(*args, **kw)
    except Exception as e:  # noqa: BLE001 - the hub's errors (connection, not found, gated) are the user's to fix
        offline = " (the hub is off: HF_HUB_OFFLINE=1 or --offline)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise IclgdError(f"{what}: cannot load data set {args[0]!r} from the Hugging Face hub{offline} "
                         f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]})") from None


def _load_hub(spec: TaskSpec, which: str) -> Split:
    if spec.hub is None:
        raise IclgdError(f"task {spec.name}: no data directory found and the task has no hub source; pass --data-dir")
    try:
        import datasets  # noqa: F401  (optional dependency, for users online)
    except ImportError:
        raise IclgdError(
            "no data directory found (--data-dir, $ICLGD_DATA_DIR, ../shared/data) and the `datasets` "
            "package is not installed to fetch from the hub"
        ) from None
    split = spec.hub.demo_split if which == "demo" else spec.hub.eval_split
    ds = hub_dataset(f"task {spec.name}", spec.hub.path, spec.hub.name, split=split)
    rows = [{ours: ex[theirs] for ours, theirs in spec.hub.columns.items()} | {"idx": i} for i, ex in enumerate(ds)]
    return Split(rows, f"hf://{spec.hub.path}/{spec.hub.name or ''}:{split}")


def load_split(spec: TaskSpec, which: str, data_dir: Path | None) -> Split:
    """``which`` is 'demo' or 'eval'. Absolute paths (user specs) ignore the data directory."""
    rel = spec.demo_file if which == "demo" else spec.eval_file
    p = Path(rel)
    if not p.is_absolute():
        if data_dir is None:
            return _load_hub(spec, which)
        p = data_dir / rel
    from iclgd.core.io import sha256_file

    return Split(load_jsonl(p, spec), str(p), sha256_file(p))


@dataclass
class TaskData:
    """The evaluated test examples and the pool demonstrations are drawn from, for one task."""

    spec: TaskSpec
    eval_rows: list[dict]
    demo_pool: list[dict]
    files: dict[str, str]  # path -> sha256
    deviations: list[str]


def eval_order(n: int, seed: int) -> np.ndarray:
    """The permutation HF ``Dataset.shuffle(seed=...)`` applies (numpy default_rng(seed).permutation)."""
    return np.random.default_rng(seed).permutation(n)


def load_task(spec: TaskSpec, data_dir: Path | None, n_test: int | None = None) -> TaskData:
    """Evaluation split shuffled with seed 1 and cut to 2,000 (then to ``n_test``), and the demo pool."""
    ev = load_split(spec, "eval", data_dir)
    order = eval_order(len(ev.rows), spec.eval_shuffle_seed)
    deviations = list(spec.deviations)
    files = {ev.source: ev.sha256} if ev.sha256 else {}
    try:
        demo = load_split(spec, "demo", data_dir)
        pool = demo.rows
        if demo.sha256:
            files[demo.source] = demo.sha256
    except IclgdError:
        if spec.demo_fallback is None or data_dir is None or (data_dir / spec.demo_file).exists():
            raise
        pool = [ev.rows[i] for i in order[spec.eval_cap:]]
        deviations.append(spec.demo_fallback)
        demo = None
    if demo is not None and Path(demo.source).resolve() == Path(ev.source).resolve():  # test examples, with their labels, in their own prompts
        raise IclgdError(f"task {spec.name}: its demonstration file is its evaluation file ({ev.source}); give "
                         "demo_file and eval_file two different files")
    chosen = order[: spec.eval_cap]
    kept, removed = without_eval_texts(spec, pool, [ev.rows[i] for i in chosen])
    if removed and spec.demo_overlap == "remove":
        pool = kept
        deviations.append(f"{removed} demonstration row(s) whose text is also an evaluation row's removed from the "
                          "demonstration pool (a test example, with its label, never appears in a prompt)")
    elif removed:
        deviations.append(f"{removed} of {len(pool)} demonstration rows have the text of an evaluation row, kept "
                          "(demo_overlap: keep; the task's inputs repeat by design)")
    if n_test is not None:
        if n_test < 1:
            raise IclgdError(f"--n-test {n_test}: expected a positive number of test examples")
        chosen = chosen[:n_test]
    return TaskData(spec, [ev.rows[i] for i in chosen], pool, files, deviations)


def without_eval_texts(spec: TaskSpec, pool: list[dict], eval_rows: list[dict]) -> tuple[list[dict], int]:
    """The demonstration pool without the rows whose input texts (every field the template reads) are an
    evaluation row's, and how many were removed: the set of evaluation rows (all ``eval_cap`` of them, so the pool
    does not depend on ``--n-test``) never leaks into a prompt."""
    keys = sorted(set(spec.fields.values()))
    seen = {tuple(r[k] for k in keys) for r in eval_rows}
    kept = [r for r in pool if tuple(r[k] for k in keys) not in seen]
    return kept, len(pool) - len(kept)


def load_tasks(task: str, task_spec=None, data_dir=None, n_test: int | None = None
               ) -> tuple[list[TaskData], Path | None]:
    """Every requested task's data (a name, a comma list, 'all', or one --task-spec file), and the data
    directory used. All data errors surface here, before any model is loaded."""
    if isinstance(task, TaskSpec) or isinstance(task_spec, TaskSpec):
        specs = [resolve_task(task, task_spec)]
    else:
        names = [None] if task_spec is not None else parse_task_list(task)
        specs = [resolve_task(n or "", str(task_spec) if task_spec else None) for n in names]
    ddir = resolve_data_dir(data_dir)
    return [load_task(s, ddir, n_test) for s in specs], ddir


def sample_demos(pool: list[dict], k: int, seed: int, balanced: bool = False, n_labels: int | None = None) -> list[dict]:
    """The paper's rule: shuffle the train split with the run's seed, keep the first k.

    ``balanced`` instead takes, in that shuffled order, examples class by class in round robin, then shuffles
    the chosen ones with the same seed: round-robin order alone would always end the prompt (and finetuning's
    last steps) on the last label, confounding recency with label identity.
    """
    if k < 0:
        raise IclgdError(f"--k {k}: expected a non-negative number of demonstrations")
    if k > len(pool):
        raise IclgdError(f"--k {k}: larger than the demonstration split ({len(pool)} examples)")
    order = np.random.default_rng(seed).permutation(len(pool))
    if not balanced:
        return [pool[i] for i in order[:k]]
    by_label: dict[int, list[dict]] = {}
    for i in order:
        by_label.setdefault(pool[i]["label"], []).append(pool[i])
    labels = sorted(by_label) if n_labels is None else [l for l in range(n_labels) if l in by_label]
    out, depth = [], 0
    while len(out) < k:
        for lab in labels:
            if depth < len(by_label[lab]) and len(out) < k:
                out.append(by_label[lab][depth])
        depth += 1
    rng = np.random.default_rng([seed, 1])  # a stream of its own: the same seed, independent of the draw above
    return [out[i] for i in rng.permutation(len(out))]
