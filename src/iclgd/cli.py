"""The ``iclgd`` command line, generated from the experiments' declarations.

Each command's options are the fields of its experiment's config dataclass (:func:`command`: help, defaults,
choices and checks come from there; :mod:`iclgd.core.options`); its body calls the experiment's ``run`` and
echoes what :mod:`iclgd.report.terminal` formats. Every user-caused error is an
:class:`~iclgd.core.errors.IclgdError`, printed as one line with exit status 2.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import typer
import typer.core

try:  # typer >= 0.26 carries its own copy of click
    from typer._click import exceptions as _cx
except ImportError:  # pragma: no cover
    from click import exceptions as _cx

from iclgd.core import options as check
from iclgd.core.errors import IclgdError
from iclgd.core.runfolder import lock


class _PlainHelp:
    """--help is a flag: shown without a value type, like every other flag."""

    def get_help_option(self, ctx):
        opt = super().get_help_option(ctx)
        if opt is not None:
            opt.metavar = ""
        return opt


class Command(_PlainHelp, typer.core.TyperCommand):
    def parse_args(self, ctx, args):
        """An option given twice (``--k 2 --k 5``, ``--dual --no-dual``) is refused: the parser would keep the last
        one silently."""
        seen: dict[str, str] = {}
        names = {o: p for p in self.params if getattr(p, "param_type_name", None) == "option"
                 and not getattr(p, "multiple", False) for o in (*p.opts, *p.secondary_opts)}
        for a in args:
            if a == "--":
                break
            p = names.get(a.split("=", 1)[0]) if a.startswith("-") else None
            if p is not None:
                if p.name in seen:
                    both = seen[p.name] if seen[p.name] == a.split("=", 1)[0] else f"{seen[p.name]} / {a.split('=', 1)[0]}"
                    raise _cx.UsageError(f"{both}: the same option given twice (the last would win silently); give "
                                         "it once", ctx=ctx)
                seen[p.name] = a.split("=", 1)[0]
        return super().parse_args(ctx, args)


class Group(_PlainHelp, typer.core.TyperGroup):
    pass


class OneLineErrors(Group):
    """Usage errors of the option parser in the same one-line ``error: ...`` form (exit 2) as IclgdError."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                              **extra)
        except _cx.NoArgsIsHelpError as e:
            e.show()
            rv = 2
        except _cx.ClickException as e:
            msg = " ".join(e.format_message().split()) or type(e).__name__
            hint = f" (see '{e.ctx.command_path} --help')" if getattr(e, "ctx", None) is not None else ""
            typer.echo(f"error: {msg}{hint}", err=True)
            rv = e.exit_code if e.exit_code else 2
        except typer.Abort:  # (typer >= 0.26: its own class, not in its bundled click)
            typer.echo("error: aborted", err=True)
            rv = 1
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(add_completion=False, no_args_is_help=True, cls=OneLineErrors)  # help: _root's docstring
_QUIET = {"on": False}


def progress() -> bool:
    """Progress: a bar on a terminal, a line a minute in a log file (``ICLGD_PROGRESS``, iclgd.core.progress);
    never with ``--quiet``."""
    from iclgd.core.progress import shown

    return not _QUIET["on"] and shown()


def _print_version(value: bool) -> None:
    if value:
        from iclgd import __version__

        typer.echo(f"iclgd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="print the version and exit", metavar=""),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress (a bar on a terminal, a line a minute in a log; ICLGD_PROGRESS)",
                               metavar=""),
    offline: bool = typer.Option(False, "--offline", help="never reach the Hugging Face hub (sets HF_HUB_OFFLINE=1): "
                                                          "models and data sets from local files and the hub cache "
                                                          "only", metavar=""),
) -> None:
    """iclgd: in-context learning as implicit gradient descent (Dai et al. 2022), measured on your own models."""
    _QUIET["on"] = quiet
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        if "huggingface_hub.constants" in sys.modules:  # read at import: already imported, so set there too
            sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True


class _WarningLine(logging.Handler):
    """iclgd's own warnings (e.g. a GPU batch halved on out-of-memory) as ``warning: ...`` lines on stderr, and its
    notes (a long first-use step about to start) as ``note: ...`` lines."""

    def emit(self, record: logging.LogRecord) -> None:
        kind = "warning" if record.levelno >= logging.WARNING else "note"
        typer.echo(f"{kind}: {record.getMessage()}", err=True)


def _quiet_libraries() -> None:
    """Third-party chatter off (transformers' info logs and progress bars, torch's and others' Python warnings);
    iclgd's own warnings stay on, through :mod:`logging`."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", module=r"(?!iclgd)")  # warnings issued by any module but iclgd's
    logger = logging.getLogger("iclgd")
    if not any(isinstance(h, _WarningLine) for h in logger.handlers):
        logger.addHandler(_WarningLine(logging.INFO))
        logger.setLevel(logging.INFO)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


OVERWRITE_HELP = "replace the results of an earlier run in --out"


def user_errors(fn):
    """The one top-level handler of every command: an IclgdError (a user's input) is ``error: <message>`` and exit
    status 2; any other exception is a bug: one ``error:`` line naming it, saying so and giving the path of the
    full traceback, which goes to a log file (:func:`bug_log`), and exit status 1. Never a traceback on screen."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            _quiet_libraries()
            return fn(*args, **kwargs)
        except IclgdError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            typer.echo("error: interrupted (results written so far are complete; rerun the command to resume)",
                       err=True)
            raise typer.Exit(130) from None
        except Exception as e:  # noqa: BLE001 - the last line of defence: a bug, reported as one
            from iclgd.core.errors import disk_error

            disk = disk_error(e, out=kwargs.get("out"))  # a full or read-only disk is the machine's, not a bug
            if disk is not None:
                typer.echo(f"error: {disk}", err=True)
                raise typer.Exit(2) from None
            path = bug_log()
            msg = " ".join(str(e).split())[:300]
            typer.echo(f"error: {type(e).__name__}{': ' + msg if msg else ''} — this is a bug in iclgd, please report "
                       f"it (full traceback: {path})", err=True)
            raise typer.Exit(1) from None

    return wrapper


def bug_log() -> str:
    """Write the current exception's traceback, with the command line and versions, to
    ``$ICLGD_CACHE/logs/`` (default ``~/.cache/iclgd/logs``; the temporary folder if that is not writable)."""
    import tempfile
    import time
    import traceback

    from iclgd import __version__

    text = (f"iclgd {__version__}, python {sys.version.split()[0]}, argv {sys.argv}\n\n"
            + traceback.format_exc())
    name = f"iclgd-bug-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    from iclgd.core.io import cache_root

    for folder in (cache_root() / "logs",
                   Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text, encoding="utf-8")
            return str(folder / name)
        except OSError:
            continue
    return "(no writable folder for the log)"


# ----------------------------------------------------------------------------- commands generated from configs


def _flat(cls, prefix: str = "") -> list[tuple[str, object, dict]]:
    """The CLI options of config class ``cls``: (parameter name, field, metadata), nested configs flattened."""
    import dataclasses

    out = []
    for f in dataclasses.fields(cls):
        m = check.meta(f)
        if m.get("nested"):
            out += _flat(f.default_factory, prefix)
        elif m.get("cli"):
            out.append((f.name, f, m))
    names = [n for n, _, _ in out]
    assert len(names) == len(set(names)), f"{cls.__name__}: an option name appears twice"
    return out


def _default_of(f):
    import dataclasses

    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _cli_type(f, m):
    d = _default_of(f)
    return m["type"] or (type(d) if isinstance(d, (bool, int, float, str, Path)) else str)


def _text(v):
    """A default as the CLI shows and parses it (lists as comma lists)."""
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v


def _typer_option(f, m):
    typ, d = _cli_type(f, m), _default_of(f)
    help_ = m["help"]
    if m["choices"] is not None and "one of" not in help_:
        help_ += f" (one of: {', '.join(map(str, m['choices']))})"
    names = [check.flag_of(f), *m["aliases"]]
    if typ is bool:
        if d:  # on by default: --name / --no-name
            names = [f"{check.flag_of(f)}/--no-{check.flag_of(f)[2:]}"]
        return bool, typer.Option(d, *names, help=help_, metavar="")
    kw = {"show_default": m["show_default"]} if m["show_default"] is not None else {}
    return typ, typer.Option(_text(d), *names, help=help_, **kw)


def _build(cls, values: dict, renamed: dict):
    """An instance of config ``cls`` from the parsed CLI values (built as from Python, by
    :func:`iclgd.experiments.protocol.make`); an option given under its old name replaces the new one (both at
    once: a one-line error)."""
    from iclgd.experiments.protocol import make

    flat = {}
    for pname, f, m in _flat(cls):
        v = values[pname]
        if m["old"] is not None and values.get(pname + "__old") is not None:
            if v != _text(_default_of(f)):
                raise IclgdError(f"{m['old']} is the old name of {check.flag_of(f)}: give one of them")
            v = values[pname + "__old"]
            renamed[check.flag_of(f)] = m["old"]
        flat[pname] = v
    return make(cls, cls.__name__, **flat)


def command(group, name: str, config_cls=None, **extra):
    """Register ``body(cfg, **extra)`` as command ``name`` of ``group``: its options are the fields of the
    experiment's config (``iclgd.experiments.protocol.experiments()[name].config``, or ``config_cls``), with
    their help, defaults and checks, plus the ``extra`` typer options (``out``, ``overwrite`` ...). The config
    is built, so validated, before the body runs."""
    import inspect
    import re

    config_cls = config_cls or EXP[name].config
    leaf = name.split()[-1]

    def deco(body):
        params, annotations = [], {}
        for pname, f, m in _flat(config_cls):
            typ, opt = _typer_option(f, m)
            params.append(inspect.Parameter(pname, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=typ))
            annotations[pname] = typ
            if m["old"] is not None:
                params.append(inspect.Parameter(pname + "__old", inspect.Parameter.KEYWORD_ONLY, annotation=typ,
                                                default=typer.Option(None, m["old"], hidden=True,
                                                                     help=f"old name of {check.flag_of(f)}")))
                annotations[pname + "__old"] = typ
        for ename, (typ, opt) in extra.items():
            params.append(inspect.Parameter(ename, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=typ))
            annotations[ename] = typ

        def run(**values):
            renamed: dict[str, str] = {}
            try:
                cfg = _build(config_cls, values, renamed)
            except IclgdError as e:  # name the option as the user gave it
                msg = str(e)
                for new, old in renamed.items():
                    msg = re.sub(re.escape(new) + r"(?![\w-])", old, msg)
                raise IclgdError(msg) from None
            return body(cfg, **{e: values[e] for e in extra})

        run.__signature__ = inspect.Signature(params)
        run.__annotations__ = annotations
        run.__doc__, run.__name__ = body.__doc__, body.__name__
        group.command(leaf, cls=Command)(user_errors(run))
        return body

    return deco


def out_option(required: bool = False, help: str = "run folder of the results"):
    return Path, typer.Option(... if required else None, "--out", help=help)


def overwrite_option(help: str = OVERWRITE_HELP):
    return bool, typer.Option(False, "--overwrite", help=help, metavar="")


def format_option():
    return str, typer.Option("table", "--format", metavar="<str>",
                             help="what to print: table (narrow, for the terminal), csv (tidy rows with a baseline "
                                  "column), json (the result, strict JSON), md or latex (report.md's table)")


def check_format(fmt: str) -> None:
    """--format is checked before any model loads."""
    from iclgd.report.terminal import FORMATS

    if fmt not in FORMATS:
        raise IclgdError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")


def show(res, fmt: str, text) -> None:
    """Print ``text()`` (the terminal table) or the result in ``--format``; with a machine format, what else a
    command says ("wrote ...") goes to stderr (:func:`say`), so stdout is the table alone."""
    from iclgd.report.terminal import formatted

    typer.echo(text() if fmt == "table" else formatted(res, fmt))


def say(msg: str, fmt: str = "table") -> None:
    typer.echo(msg, err=fmt != "table")


# ----------------------------------------------------------------------------- the commands
#
# Each command is an experiment's config (its options, generated above) and the experiment's own run function;
# what a command prints comes from iclgd.report.terminal, its plots from iclgd.report.plots.

from iclgd.experiments import sweep as _sweep  # noqa: E402
from iclgd.experiments.protocol import experiments  # noqa: E402

EXP = experiments()  # every experiment, by command name: config, run, result, unit kinds


@command(app, "eval", out=out_option(help="write results.json here"), overwrite=overwrite_option(),
         fmt=format_option())
def eval_cmd(job, out, overwrite, fmt):
    """Zero-shot and in-context accuracy of a causal LM on the paper's tasks."""
    from iclgd.report.terminal import eval_text

    check.out_dir(out), check_format(fmt)
    res = EXP["eval"].run(job, out, overwrite, progress())
    show(res, fmt, lambda: eval_text(res.doc))
    if out is not None:
        say(f"wrote {out / 'results.json'}", fmt)


@command(app, "compare",
         out=out_option(help="write results.json, records.jsonl and per-layer plots here"),
         overwrite=overwrite_option(), fmt=format_option())
def compare_cmd(job, out, overwrite, fmt):
    """ZSL vs ICL vs K/V finetuning on the same demonstrations, with Rec2FTP, SimAOU, SimAM and Kendall."""
    from iclgd.report.plots import plot_compare_file
    from iclgd.report.terminal import compare_text

    check.out_dir(out), check_format(fmt)
    res = EXP["compare"].run(job, out, overwrite, progress(), each=plot_compare_file)
    show(res, fmt, lambda: compare_text(list(res.docs.values())))
    if out is not None:
        say(f"wrote results.json, records.jsonl and per-layer plots under {out}", fmt)


@command(app, "mechanisms", out=out_option(help="write results.json, records.jsonl and the per-layer plot here"),
         overwrite=overwrite_option(), fmt=format_option())
def mechanisms_cmd(job, out, overwrite, fmt):
    """Task vectors, function vectors and induction heads beside the implicit-GD metrics, on compare's prompts."""
    from iclgd.report.plots import plot_layer_curves
    from iclgd.report.terminal import mechanisms_text

    check.out_dir(out), check_format(fmt)
    res = EXP["mechanisms"].run(job, out, overwrite, progress())
    show(res, fmt, lambda: mechanisms_text(list(res.docs.values())))
    if out is not None:
        for name, doc in res.docs.items():
            control = (doc.get("untrained") or {}).get("seeds")
            plot_layer_curves(doc["seeds"], control, (out / name).parent / "mechanisms_layers.png",
                              f"{doc['config']['model']} · {doc['config']['task']['name']}")
        say(f"wrote results.json, records.jsonl and mechanisms_layers.png under {out}", fmt)


@command(app, "pretrain",
         out=out_option(True, "run folder (resumes if it holds a checkpoint of the same configuration)"),
         overwrite=overwrite_option("start over in a folder that holds a run of another configuration"),
         fmt=format_option())
def pretrain_cmd(job, out, overwrite, fmt):
    """Train a small Llama-style LM from scratch, with vanilla or momentum attention."""
    check.out_dir(out), check_format(fmt)
    res = EXP["pretrain"].run(job, out, overwrite, progress())
    r = res.to_dict()
    show(res, fmt, lambda: f"final train loss {r['final_train_loss']:.4f}; log in {out / 'log.csv'}")


momentum_app = typer.Typer(no_args_is_help=True, cls=Group, help="Momentum attention: training study and zero-training probe.")
app.add_typer(momentum_app, name="momentum")


@command(momentum_app, "momentum compare",
         out=out_option(True, "folder of the runs, results.json and val_curves.png"), overwrite=overwrite_option(),
         fmt=format_option())
def momentum_compare(cfg, out, overwrite, fmt):
    """Train vanilla and momentum per seed (same init and data order); perplexity and ICL side by side."""
    from iclgd.report.plots import plot_curves
    from iclgd.report.terminal import momentum_text

    check.out_dir(out), check_format(fmt)
    res = EXP["momentum compare"].run(cfg, out, overwrite, progress())
    plot_curves(out, cfg.seeds, cfg.variants)
    show(res, fmt, lambda: momentum_text(res.to_dict()))
    say(f"wrote {out / 'results.json'} and {out / 'val_curves.png'}", fmt)


@command(momentum_app, "momentum apply", out=out_option(help="write momentum_apply.json here"),
         overwrite=overwrite_option(), fmt=format_option())
def momentum_apply(cfg, out, overwrite, fmt):
    """Add the EMA to a pretrained model without training: perplexity and ICL accuracy vs vanilla."""
    from iclgd.report.terminal import apply_text

    check.out_dir(out), check_format(fmt)
    res = EXP["momentum apply"].run(cfg, out, overwrite, progress())
    show(res, fmt, lambda: apply_text(res.to_dict()))


@command(app, "synthetic",
         out=out_option(help="write results.json (or seed-*/ and summary.json) and plots here"),
         overwrite=overwrite_option(), fmt=format_option())
def synthetic_cmd(job, out, overwrite, fmt):
    """In-context linear regression: a trained attention model vs GD, and the metrics' calibration."""
    from iclgd.report.plots import plot_synthetic_result
    from iclgd.report.terminal import synthetic_text

    check.out_dir(out), check_format(fmt)
    res = EXP["synthetic"].run(job, out, overwrite, progress())
    show(res, fmt, lambda: synthetic_text(res.runs, res.docs.get("summary.json")))
    if out is not None:
        say("wrote " + plot_synthetic_result(res, out), fmt)


@command(app, "reproduce", _sweep.SweepConfig,
         shard=(str, typer.Option(None, help="i/n: process i of n sharing the sweep's unit queue (job arrays)")),
         data_dir=(Path, typer.Option(None, help="data directory (recorded with its checksums in sweep.json)")),
         out=(Path, typer.Option(Path("runs/repro"), help="the sweep folder (resumes a run of the same "
                                                          "configuration)")),
         overwrite=overwrite_option("discard the finished units of another configuration in --out"))
def reproduce_cmd(cfg, shard, data_dir, out, overwrite):
    """The paper's analyses as resumable units (model x task x seed), then report.md from their results."""
    from iclgd.api import run_sweep

    check.out_dir(out)
    typer.echo(run_sweep(cfg, out, data_dir, shard, overwrite, progress()))


@app.command("report", cls=Command)
@user_errors
def report_cmd(out: Path = typer.Argument(..., help="a run folder: reproduce, or any command's --out")):
    """report.md (tables, plots embedded) and a tidy results.csv from a run folder's result files alone."""
    from iclgd.api import regenerate

    typer.echo(f"wrote {regenerate(out)}")


dual_app = typer.Typer(no_args_is_help=True, cls=Group, help="The dual form between attention and gradient descent.")
app.add_typer(dual_app, name="dual")


@command(dual_app, "dual verify",
         json_out=(bool, typer.Option(False, "--json", help="print the per-head rows as JSON", metavar="")),
         out=out_option(help="write dual_verify.json and dual_verify.png here"), overwrite=overwrite_option(),
         fmt=format_option())
def dual_verify(cfg, json_out, out, overwrite, fmt):
    """Check ICL = (W_ZSL + ΔW_ICL) q on every layer and head of a real model, and measure the softmax gap."""
    import json

    from iclgd.report.plots import plot_verify
    from iclgd.report.terminal import verify_text

    check.out_dir(out), check_format(fmt)
    res = EXP["dual verify"].run(cfg, out, overwrite)
    r = res.doc
    if json_out:
        typer.echo(json.dumps({"summary": r["summary"], "rows": r["rows"]}, indent=1))
    else:
        show(res, fmt, lambda: verify_text(r, cfg.model))
    if out is not None:
        meta = r["config"]
        plot_verify(r["per_layer"], out / "dual_verify.png", f"{cfg.model} · {meta['task']} · k={meta['k_true']} · "
                                                             f"{cfg.dtype}")
        say(f"wrote {out / 'dual_verify.json'} and {out / 'dual_verify.png'}", fmt)
    if not r["summary"]["within_tolerance"]:
        raise typer.Exit(1)


@command(dual_app, "dual compare-updates",
         out=out_option(help="write the per-layer comparison (dual_updates.json) here"), overwrite=overwrite_option(),
         fmt=format_option())
def dual_compare_updates(cfg, out, overwrite, fmt):
    """Compare ΔW_FT = W_ZSL(after) − W_ZSL(before) with ΔW_ICL, per layer (LMOps issue #22)."""
    from iclgd.report.terminal import updates_text

    check.out_dir(out), check_format(fmt)
    res = EXP["dual compare-updates"].run(cfg, out, overwrite)
    show(res, fmt, lambda: updates_text(res.to_dict()))


# ----------------------------------------------------------------------------- the ICL world

world_app = typer.Typer(no_args_is_help=True, cls=Group, help="The ICL world: few-shot classification models trained here.")
app.add_typer(world_app, name="world")


@command(world_app, "world train", out=out_option(True, "world folder (resumes if it holds a checkpoint)"),
         overwrite=overwrite_option("start over in a folder that holds a run of another configuration"),
         fmt=format_option())
def world_train(job, out, overwrite, fmt):
    """Train a world model; writes DIR/model (HF folder), DIR/tasks, DIR/data, DIR/checkpoints, DIR/log.csv."""
    from iclgd.report.terminal import world_text

    check.out_dir(out), check_format(fmt)
    res = EXP["world train"].run(job, out, overwrite, progress())
    show(res, fmt, lambda: world_text(res.to_dict()))
    say(f"wrote {out / 'model'}, {out / 'tasks'}, {out / 'data'}, {out / 'log.csv'}", fmt)


@world_app.command("tasks", cls=Command)
@user_errors
def world_tasks(
    folder: Path = typer.Argument(None, help="a world folder (its world.json is used), or a new folder; or --out",
                                  show_default=False),
    out: Path = typer.Option(None, "--out", help="the same folder, as an option (like every other command)"),
    world_seed: int = typer.Option(0, help="for a folder without world.json"),
):
    """Write the world's evaluation tasks: DIR/tasks/world-T.json and DIR/data/world-T/{demo,eval}.jsonl."""
    from iclgd.engine.world import write_world_tasks

    if (folder is None) == (out is None):
        raise IclgdError("world tasks: give the folder once, as --out DIR (or as DIR)")
    out = out or folder
    check.seed("--world-seed", world_seed), check.out_dir(out, "--out")
    with lock(out):
        written = write_world_tasks(out, world_seed)
    for p in written:
        typer.echo(f"wrote {p}")
    typer.echo(f"data under {out / 'data'}; e.g. iclgd compare --model {out / 'model'} --task-spec "
               f"{out / 'tasks' / 'world-0.json'} --data-dir {out / 'data'} --k 16")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
