"""Files a person can edit, read through schemas (pydantic): one line naming the file, the line and the field.

Task specs and data rows have their schemas in :mod:`iclgd.core.tasks`; the configuration files a run folder
holds (``world.json``, ``train_config.json``) are read here against the dataclasses that wrote them.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ConfigDict, TypeAdapter, ValidationError

from iclgd.core.errors import IclgdError


def line_of(text: str, key: str) -> int:
    """The line of ``"key"`` in a JSON text (1 if not found), so that errors name a line."""
    i = text.find(f'"{key}"')
    return text.count("\n", 0, i) + 1 if i >= 0 else 1


def parse_json_text(path: Path, text: str):
    """JSON with duplicate keys refused (one line naming the key's line); NaN and Infinity are parsed, then refused
    by the schemas that read numbers."""
    def hook(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise IclgdError(f"{path}:{line_of(text, k)}: key {k!r} appears twice in one object (JSON keeps the "
                                 "last silently); give it once")
            seen.add(k)
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=hook)
    except json.JSONDecodeError as e:
        raise IclgdError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None


def schema_error(path: Path, text: str, err: ValidationError, allowed=None) -> IclgdError:
    """A pydantic error as one line: the file, the line of the field, the field, what was expected, what was given."""
    e = err.errors()[0]
    key = str(e["loc"][0]) if e["loc"] else ""
    sub = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in e["loc"][1:])
    msg = e["msg"].removeprefix("Value error, ")
    msg = msg[:1].lower() + msg[1:]
    if e["type"] == "string_pattern_mismatch":
        msg = "expected a non-empty string"
    elif e["type"] == "model_type" or e["type"] == "dict_type":
        msg = "expected a JSON object"
    if e["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        msg = "unknown field" + (f" (expected some of {', '.join(sorted(allowed))})" if allowed and not sub else "")
    elif e["type"] in ("missing", "missing_argument"):
        msg = "required field missing"
    got = "" if msg.startswith(("unknown", "required")) else f", got {json.dumps(e.get('input'), default=str)[:40]}"
    for py, js in (("NoneType", "null"), ("int", "an integer"), ("str", "a string"), ("float", "a number"),
                   ("list", "a list"), ("dict", "an object"), ("bool", "a boolean")):
        msg = msg.replace(f"a {py}", js).replace(f"an {py}", js)
    return IclgdError(f"{path}:{line_of(text, key)}: field {key}{sub}: {msg}{got}")


def read_text(path: Path, what: str) -> str:
    try:
        return Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise IclgdError(f"{path}: {what} not found") from None
    except UnicodeDecodeError as e:
        raise IclgdError(f"{path}: not UTF-8 text (byte {e.start}); it is not an iclgd {what}") from None
    except OSError as e:
        raise IclgdError(f"{path}: cannot read the {what} ({e.strerror})") from None


def read_config(path: Path, cls, what: str):
    """A JSON file holding a configuration dataclass ``cls`` (as :func:`dataclasses.asdict` wrote it), validated
    strictly: types, finite numbers, no unknown or duplicate keys. Returns the dataclass."""
    import dataclasses

    path = Path(path)
    text = read_text(path, what)
    raw = parse_json_text(path, text)
    if not isinstance(raw, dict):
        raise IclgdError(f"{path}: a {what} is a JSON object, got a {type(raw).__name__}")
    import typing

    def lacking(c, doc, where=""):
        hints = typing.get_type_hints(c)
        for f in dataclasses.fields(c):
            if f.name not in doc:
                return where + f.name
            if dataclasses.is_dataclass(hints[f.name]) and isinstance(doc[f.name], dict):
                inner = lacking(hints[f.name], doc[f.name], f"{where}{f.name}.")
                if inner:
                    return inner
        return None

    missing = lacking(cls, raw)
    if missing:
        raise IclgdError(f"{path}: field {missing}: required field missing (this file records every setting of the "
                         "run; a default would describe a run that never was)")
    try:
        return _adapter(cls).validate_json(text)  # (strict JSON mode: arrays for tuples, no strings for numbers)
    except IclgdError as e:  # the dataclass's own checks (__post_init__) name the value, not the file
        raise IclgdError(f"{path}: {e}") from None
    except ValidationError as e:
        raise schema_error(path, text, e, [f.name for f in dataclasses.fields(cls)]) from None


_ADAPTERS: dict = {}


def _adapter(cls) -> TypeAdapter:
    """A strict adapter for a stdlib dataclass (nested ones validated too; unknown keys refused)."""
    import dataclasses
    import typing

    if cls not in _ADAPTERS:
        todo = [cls]
        while todo:  # the config on every dataclass nested in it
            c = todo.pop()
            c.__pydantic_config__ = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
            hints = typing.get_type_hints(c)
            todo += [hints[f.name] for f in dataclasses.fields(c) if dataclasses.is_dataclass(hints[f.name])]
        _ADAPTERS[cls] = TypeAdapter(cls)
    return _ADAPTERS[cls]
