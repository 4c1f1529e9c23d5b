"""Checks of option values, run by the CLI before any model is loaded, any work done or any file written.

Each check raises an :class:`~iclgd.core.errors.IclgdError` whose one line names the option, the value
and what was expected.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from iclgd.core.errors import IclgdError

DTYPES = ("float32", "float64", "bfloat16", "float16")
MAX_SEED = 2**32 - 1  # numpy's default_rng and torch.manual_seed both accept 0 .. 2**32-1 everywhere


def at_least(option: str, value: int | None, low: int) -> None:
    """``value >= low`` (None: the option was not given)."""
    if value is not None and value < low:
        want = {0: "a non-negative integer", 1: "a positive integer"}.get(low, f"an integer >= {low}")
        raise IclgdError(f"{option} {value}: expected {want}")


def batch_size(value: str) -> int | str:
    """``--batch-size``: 'auto' or a positive integer; returns the int, or 'auto'."""
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        raise IclgdError(f"--batch-size {value!r}: expected 'auto' or a positive integer") from None
    at_least("--batch-size", n, 1)
    return n


def positive_float(option: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise IclgdError(f"{option} {value}: expected a finite positive number")


def seed(option: str, value: int) -> None:
    if not 0 <= value <= MAX_SEED:
        raise IclgdError(f"{option} {value}: expected a seed between 0 and {MAX_SEED}")


def seed_list(option: str, values: list[int]) -> None:
    """Seeds are independent repetitions: each valid, none twice (a duplicate would count one run twice)."""
    for v in values:
        seed(option, v)
    dup = sorted({v for v in values if values.count(v) > 1})
    if dup:
        raise IclgdError(f"{option} {','.join(map(str, values))}: seed {dup[0]} appears twice (expected distinct seeds)")


def distinct(option: str, values: list) -> None:
    dup = sorted({str(v) for v in values if values.count(v) > 1})
    if dup:
        raise IclgdError(f"{option}: {dup[0]} appears twice (expected distinct values)")


def one_of(option: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise IclgdError(f"{option} {value!r}: expected one of {', '.join(allowed)}")


def dtype(value: str, allowed: tuple[str, ...] = DTYPES, option: str = "--dtype") -> None:
    one_of(option, value, allowed)


def device(value: str, option: str = "--device") -> None:
    """auto (CUDA, then MPS, else CPU), cpu, cuda or cuda:N (an available GPU), or mps (an available Apple GPU)."""
    if value == "auto":
        return
    m = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", value)
    if m is None or (m.group(1) != "cuda" and m.group(2) is not None):
        raise IclgdError(f"{option} {value!r}: expected auto, cpu, cuda, cuda:N or mps")
    if m.group(1) == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise IclgdError(f"{option} {value}: no CUDA GPU is available on this machine (use --device cpu)")
        if m.group(2) is not None and int(m.group(2)) >= torch.cuda.device_count():
            raise IclgdError(f"{option} {value}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if m.group(1) == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise IclgdError(f"{option} {value}: no Apple MPS GPU is available on this machine (use --device cpu)")


def device_map(value: str | None, dev: str) -> None:
    """``auto`` spreads a model over the GPUs; it replaces --device, so both at once would record a false device."""
    if value is None:
        return
    if value != "auto":
        raise IclgdError(f"--device-map {value!r}: expected auto")
    import torch

    if not torch.cuda.is_available():
        raise IclgdError("--device-map auto: no CUDA GPU is available on this machine")
    if not dev.startswith("cuda"):
        raise IclgdError(f"--device-map auto places the model on the GPUs; --device {dev} would be recorded "
                         "falsely (give --device cuda)")


def out_dir(path: Path | None, option: str = "--out") -> None:
    """An output folder that can be created and written, checked without creating it (nothing is left
    behind when a later check fails)."""
    if path is None:
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise IclgdError(f"{option} {path}: exists and is not a directory")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise IclgdError(f"{option} {path}: cannot create the output directory ({probe} is not a directory)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise IclgdError(f"{option} {path}: the output directory is not writable ({probe})")


def text(option: str, value: str | None, allow_empty: bool = True) -> None:
    """A string option without NUL characters (they cannot reach a tokenizer or a file name)."""
    if value is None:
        return
    if "\x00" in value:
        raise IclgdError(f"{option}: contains a NUL character")
    if not allow_empty and not value.strip():
        raise IclgdError(f"{option} {value!r}: expected a non-empty value")


# ----------------------------------------------------------------------------- options as dataclass fields
#
# An experiment's config dataclass is the only home of its options' defaults, help and checks: each field is
# declared with :func:`option`, the CLI is generated from the fields (``iclgd.cli.command``), and
# :func:`validate` (called by the dataclass's ``__post_init__``) parses and checks the values, the same way
# for a value typed at the terminal and one passed from Python.

from dataclasses import MISSING, field, fields  # noqa: E402


def option(default=MISSING, help: str = "", *, factory=MISSING, name: str | None = None, aliases: tuple = (),
           old: str | None = None, choices: tuple | None = None, parse=None, check=None, type=None,
           show_default: str | None = None, cli: bool = True, applies: tuple | None = None):
    """A config field that is also a CLI option.

    ``name``: the flag (default ``--field-name``), ``aliases`` visible other names, ``old`` a hidden name kept
    for one release; ``choices``: the allowed values (listed in --help); ``parse(flag, text)``: turns the text
    given at the terminal (or a string given from Python) into the value; ``check(flag, value)``: raises an
    IclgdError naming the flag; ``type``: the CLI's type where the default does not say it (a default of None);
    ``cli=False``: a field the CLI does not offer; ``applies=(other_field, values)``: the option takes effect only
    while ``other_field`` has one of ``values``, so setting it otherwise is refused (never recorded unapplied)."""
    meta = {"iclgd": dict(help=help, name=name, aliases=tuple(aliases), old=old, choices=choices, parse=parse,
                          check=check, type=type, show_default=show_default, cli=cli, applies=applies)}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def nested(cls):
    """A config field holding another config, whose options the CLI offers as its own."""
    return field(default_factory=cls, metadata={"iclgd": {"nested": True}})


def meta(f) -> dict:
    return f.metadata.get("iclgd", {})


def flag_of(f) -> str:
    return meta(f).get("name") or "--" + f.name.replace("_", "-")


def validate(cfg) -> None:
    """Parse and check every option field of ``cfg`` (in place), in declaration order."""
    for f in fields(cfg):
        m = meta(f)
        if not m or m.get("nested"):
            continue
        v, flag = getattr(cfg, f.name), flag_of(f)
        if v is Ellipsis:
            raise IclgdError(f"{flag}: required (no default)")
        if isinstance(v, str) and m["parse"] is not None:
            v = m["parse"](flag, v)
            setattr(cfg, f.name, v)
        if m["choices"] is not None and v not in m["choices"]:
            raise IclgdError(f"{flag} {v!r}: expected one of {', '.join(map(str, m['choices']))}")
        if m["check"] is not None:
            m["check"](flag, v)
    for f in fields(cfg):  # options as a whole: one that another option switches off is refused, not dropped
        m = meta(f)
        if not m.get("applies") or not hasattr(cfg, m["applies"][0]):
            continue
        other, values, *said = m["applies"]  # (field, allowed values or a predicate[, how to say it])
        default = default_of(f)
        ok = values(getattr(cfg, other)) if callable(values) else getattr(cfg, other) in values
        if getattr(cfg, f.name) != default and not ok:
            of = next(g for g in fields(cfg) if g.name == other)
            shown = lambda x: "" if x is True else " " + (",".join(map(str, x)) if isinstance(x, (list, tuple))  # noqa: E731
                                                          else "" if x is None else str(x))
            need = said[0] if said else " or ".join(flag_of(of) + shown(x) if x is not None else "no " + flag_of(of)
                                                     for x in values)
            v = getattr(cfg, other)
            given = (flag_of(of) if v else "--no-" + flag_of(of)[2:]) if isinstance(v, bool) else flag_of(of) + shown(v)
            raise IclgdError(f"{flag_of(f)}{shown(getattr(cfg, f.name))}: takes effect only with {need} (given "
                             f"{given}); drop it, or change {flag_of(of)}")


def default_of(f):
    return f.default_factory() if f.default_factory is not MISSING else f.default


# parsers: (flag, text) -> value

def ints(flag: str, value) -> list[int]:
    """'1,2,3' -> [1, 2, 3] (a list given from Python is kept)."""
    if not isinstance(value, str):
        return [int(v) for v in value]
    try:
        out = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise IclgdError(f"{flag} {value!r}: expected a comma list of integers, e.g. 1,2,3") from None
    if not out:
        raise IclgdError(f"{flag} {value!r}: expected a comma list of integers, e.g. 1,2,3")
    return out


def int_tuple(flag: str, value) -> tuple[int, ...]:
    return tuple(ints(flag, value))


def one_int(flag: str, value) -> int:
    """One integer, given as text ('3'); a comma list of several is refused."""
    got = ints(flag, value)
    if len(got) != 1:
        raise IclgdError(f"{flag} {value}: this command checks one prompt; give one seed")
    return got[0]


def batch_size_text(flag: str, value: str) -> int | str:
    """'auto' or a positive integer, given as text."""
    try:
        return batch_size(value)
    except IclgdError as e:
        raise IclgdError(str(e).replace("--batch-size", flag, 1)) from None


# checks: (flag, value) -> None, raising an IclgdError that names the flag

def min_int(low: int):
    def check(flag: str, value) -> None:
        at_least(flag, value, low)

    return check


def each_at_least(low: int):
    def check(flag: str, values) -> None:
        for v in values:
            at_least(flag, v, low)
        distinct(flag, list(values))

    return check


def positive(flag: str, value) -> None:
    positive_float(flag, value)


def a_seed(flag: str, value) -> None:
    if value is not None:
        seed(flag, value)


def seeds(flag: str, values) -> None:
    if not values:
        raise IclgdError(f"{flag}: expected one seed or a comma list of distinct seeds")
    seed_list(flag, list(values))


def a_device(flag: str, value) -> None:
    device(value, flag)


def no_nul(flag: str, value) -> None:
    text(flag, value)


def a_batch_size(flag: str, value) -> None:
    if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise IclgdError(f"{flag} {value!r}: expected 'auto' or a positive integer")


def momentum_eta(flag: str, value) -> None:
    """A momentum coefficient η: strictly between 0 and 1."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1):
        raise IclgdError(f"{flag} {value}: expected a momentum coefficient strictly between 0 and 1")


# ----------------------------------------------------------------------------- the options several commands share

DEFAULT_MODEL = "smollm2-135m"
MAX_LEN = 2048  # the paper's context limit (fairseq dense models)
BOS_HELP = ("start token of every prompt: a token of the vocabulary{none} (default: the model's, e.g. <|endoftext|> "
            "for SmolLM2, <bos> for Gemma)")


def _a_model(flag: str, value) -> None:
    if isinstance(value, str) and not value.strip():
        raise IclgdError(f"{flag} {value!r}: expected a model name, folder or hub id, got an empty string")


def model_field(default: str = DEFAULT_MODEL):
    return option(default, "registry name (smollm2-135m, gemma3-270m), tiny-random-*, a local folder, or a hub id "
                           "(gpt2, owner/name; downloaded unless --offline)", type=str, check=_a_model)


def tasks_field(default: str = "sst2", help: str = "task name, comma list, or 'all'"):
    return option(default, help, name="--tasks", aliases=("--task",), check=no_nul,
                  applies=("task_spec", (None,), "no --task-spec (the spec is the task)"))


def task_spec_field():
    return option(None, "JSON spec of a user task (template, label_words, files) instead of --tasks", type=Path)


def seeds_field(default=(1,), help: str = "one seed or a comma list of distinct seeds, e.g. 1,2,3", old=None):
    return option(help=help, factory=lambda: list(default), parse=ints, check=seeds, type=str, old=old)


def n_test_field(default=None, help: str = "evaluate only the first N test examples"):
    return option(default, help, type=int, check=min_int(1))


def data_dir_field(help: str = "data directory (default $ICLGD_DATA_DIR or ../shared/data, else the hub)"):
    return option(None, help, type=Path)


def dtype_field(default: str = "float32", choices: tuple = DTYPES, help: str = "weights' dtype (applied to every "
                                                                               "model)"):
    return option(default, help, choices=choices)


def device_field():
    return option("auto", "auto (CUDA, then MPS, else CPU), cpu, cuda, cuda:N or mps; results record the device "
                          "applied", check=a_device)


def bos_field(allow_none: bool = False):
    return option(None, BOS_HELP.format(none=", or 'none'" if allow_none else ""), type=str)


def k_field(default: int, low: int, help: str):
    return option(default, help, check=min_int(low))


def separator_field():
    return option("\n", "text after each demonstration (a newline by default)", check=no_nul, show_default=r"\n")


def max_len_field():
    return option(MAX_LEN, "context limit in tokens (the paper's 2048)", check=min_int(1))


def batch_size_field():
    return option("auto", "prompts scored per forward pass: a positive integer, or 'auto' (on a GPU the largest that "
                          "fits, from 64 down; 8 on CPU)", parse=batch_size_text, check=a_batch_size, type=str)


def balanced_field():
    return option(False, "class-balanced demonstrations (round robin over labels, then shuffled by the seed)")


def record_prompts_field():
    return option(False, "write each test example's whole ICL prompt (the demonstrations and the input, decoded from "
                         "the tokens the model was given) in records.jsonl; large: the demonstrations repeat per row")


EQ9 = ("attention", ("momentum",))  # options of Eq. (9) only (the EMA variant has parameters of its own)


def eta_field(default: float = 0.9, help: str = "momentum coefficient, strictly between 0 and 1", applies=EQ9):
    return option(default, help, check=momentum_eta, applies=applies)


ATTENTIONS = ("vanilla", "momentum", "ema")  # momentum: Eq. (9); ema: the authors' code variant (engine.momentum)


def attention_field():
    return option("vanilla", "vanilla, momentum (Eq. 9) or ema (the authors' code variant: a learnable 8-component EMA "
                             "over the values)", choices=ATTENTIONS)


def learnable_eta_field(applies=EQ9):
    return option(False, "learn eta per head (sigmoid-parameterised, starting from --eta)", applies=applies)


def gate_field():
    return option(False, "multiply Eq. 9's EMA by a learnable per-head gate initialised at 0", applies=EQ9)


def gate_needs_eq9(attention: str, gate: bool) -> None:
    if gate and attention != "momentum":
        raise IclgdError("--gate applies to --attention momentum (Eq. 9) only")
