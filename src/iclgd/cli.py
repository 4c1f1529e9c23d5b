"""The ``iclgd`` command line: thin wrappers that parse options, call the library, print tables.

Every user-caused error is an :class:`~iclgd.core.errors.IclgdError`, printed as one line with exit status 2.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from contextlib import nullcontext as _nothing
from pathlib import Path

import typer
import typer.core

try:  # typer >= 0.26 carries its own copy of click
    from typer._click import exceptions as _cx
except ImportError:  # pragma: no cover
    from click import exceptions as _cx

from iclgd.core import options as check
from iclgd.core.errors import IclgdError
from iclgd.core.runfolder import differing_keys, lock, read_json_object, refuse_existing


class OneLineErrors(typer.core.TyperGroup):
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
        except _cx.Abort:
            typer.echo("error: aborted", err=True)
            rv = 1
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(add_completion=False, no_args_is_help=True, cls=OneLineErrors)  # help: _root's docstring
_QUIET = {"on": False}


def progress() -> bool:
    """Progress bars only on a terminal, and never with ``--quiet``."""
    return not _QUIET["on"] and sys.stderr.isatty()


def _print_version(value: bool) -> None:
    if value:
        from iclgd import __version__

        typer.echo(f"iclgd {__version__}")
        raise typer.Exit()


# options several commands share, declared once (typer reads them; nothing mutates them)
MODEL_OPT = typer.Option("smollm2-135m", help="registry name (smollm2-135m, gemma3-270m), tiny-random-*, a local "
                                             "folder, or a hub id (gpt2, owner/name; downloaded unless --offline)")
DATA_DIR_OPT = typer.Option(None, help="data directory (default $ICLGD_DATA_DIR or ../shared/data, else the hub)")
DTYPE_OPT = typer.Option("float32", help="float32, float64, bfloat16 or float16 (applied to every model)")
DEVICE_OPT = typer.Option("auto", help="auto (CUDA, then MPS, else CPU), cpu, cuda, cuda:N or mps; results record "
                                       "the device applied")
BATCH_SIZE_OPT = typer.Option("auto", help="prompts scored per forward pass: a positive integer, or 'auto' (on a GPU "
                                            "the largest that fits, from 64 down; 8 on CPU)")
ETA_OPT = typer.Option(0.9, help="momentum coefficient, strictly between 0 and 1")
TASK_SPEC_OPT = typer.Option(None, help="JSON spec of a user task (template, label_words, files)")
SEPARATOR_OPT = typer.Option("\n", help="text after each demonstration (a newline by default)", show_default=r"\n")
BALANCED_OPT = typer.Option(False, "--balanced", help="class-balanced demonstrations (round robin over labels)",
                            metavar="")
SEEDS_HELP = "one seed or a comma list of distinct seeds, e.g. 1,2,3"
OLD_SEED_OPT = typer.Option(None, "--seed", hidden=True, help="old name of --seeds (kept for one release)")


def flag(help: str, name: str) -> typer.models.OptionInfo:
    """A boolean option that is a plain flag (``--name``, off by default), shown without a value in --help."""
    return typer.Option(False, name, help=help, metavar="")


OVERWRITE_HELP = "replace the results of an earlier run in --out"


def seeds_of(seeds: str | None, old_seed: int | None, default: str = "1") -> list[int]:
    """``--seeds`` (one or many), or its old name ``--seed`` (one); both at once is a one-line error."""
    if seeds is not None and old_seed is not None:
        raise IclgdError("--seed is the old name of --seeds: give one of them")
    out = [old_seed] if old_seed is not None else int_list(seeds if seeds is not None else default, "--seeds")
    check.seed_list("--seed" if old_seed is not None else "--seeds", out)  # named as the user gave it
    return out


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="print the version and exit", metavar=""),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars (they appear only on a terminal)",
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
    """iclgd's own warnings (e.g. a GPU batch halved on out-of-memory) as ``warning: ...`` lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(f"warning: {record.getMessage()}", err=True)


def _quiet_libraries() -> None:
    """Third-party chatter off (transformers' info logs and progress bars, torch's and others' Python warnings);
    iclgd's own warnings stay on, through :mod:`logging`."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", module=r"(?!iclgd)")  # warnings issued by any module but iclgd's
    logger = logging.getLogger("iclgd")
    if not any(isinstance(h, _WarningLine) for h in logger.handlers):
        logger.addHandler(_WarningLine(logging.WARNING))
        logger.setLevel(logging.INFO)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def user_errors(fn):
    """Turn IclgdError into ``error: <message>`` on stderr and exit status 2, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            _quiet_libraries()
            return fn(*args, **kwargs)
        except IclgdError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def one_seed(seeds: list[int], command: str) -> int:
    if len(seeds) != 1:
        raise IclgdError(f"--seeds {','.join(map(str, seeds))}: {command} checks one prompt; give one seed")
    return seeds[0]


def old_name(option: str, value, default, old: str, old_value) -> tuple:
    """An option renamed in 0.2 (``old`` kept, hidden, for one release): the value of whichever was given, and
    the name it was given under (for errors that name the option as the user typed it)."""
    if old_value is None:
        return value, option
    if value != default:
        raise IclgdError(f"{old} is the old name of {option}: give one of them")
    return old_value, old


def int_list(value: str, option: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3], or a one-line error naming the option."""
    try:
        out = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise IclgdError(f"{option} {value!r}: expected a comma list of integers, e.g. 1,2,3") from None
    if not out:
        raise IclgdError(f"{option} {value!r}: expected a comma list of integers, e.g. 1,2,3")
    return out


def no_start_token(bos: str | None) -> None:
    """Captures read the start token as the zero-shot context: the commands that take them need one."""
    if bos == "none":
        raise IclgdError("--bos none: only `iclgd eval` runs without a start token (compare, dual verify and "
                         "reproduce read it as the zero-shot context); give a token instead")


def print_table(rows: list[dict], columns: list[str]) -> None:
    import pandas as pd

    df = pd.DataFrame(rows, columns=columns)
    typer.echo(df.to_string(index=False, float_format=lambda x: f"{x:.4g}"))


@app.command("eval")
@user_errors
def eval_cmd(
    model: str = MODEL_OPT,
    task: str = typer.Option("sst2", "--tasks", "--task", help="task name, comma list, or 'all'"),
    task_spec: Path = TASK_SPEC_OPT,
    k: int = typer.Option(32, help="demonstrations requested (fewer if the context overflows)"),
    seeds: str = typer.Option(None, help=f"demonstration seeds: {SEEDS_HELP} (one ICL run each; ZSL once) "
                                         "[default: 1]"),
    seed: int = OLD_SEED_OPT,
    n_test: int = typer.Option(None, help="evaluate only the first N test examples (after the seed-1 shuffle)"),
    balanced: bool = BALANCED_OPT,
    separator: str = SEPARATOR_OPT,
    max_len: int = typer.Option(2048, help="context limit in tokens (the paper's 2048)"),
    batch_size: str = BATCH_SIZE_OPT,
    data_dir: Path = DATA_DIR_OPT,
    dtype: str = DTYPE_OPT,
    device: str = DEVICE_OPT,
    bos: str = typer.Option(None, help="start token of every prompt: a token of the vocabulary, or 'none' "
                                       "(default: the model's, e.g. <|endoftext|> for SmolLM2, <bos> for Gemma)"),
    out: Path = typer.Option(None, help="write results.json here"),
    overwrite: bool = flag(OVERWRITE_HELP, "--overwrite"),
):
    """Zero-shot and in-context accuracy of a causal LM on the paper's tasks."""
    from iclgd.engine.scoring import EvalConfig
    from iclgd.experiments.eval import SUMMARY, EvalJob, run, summary_rows, write

    seed_list = seeds_of(seeds, seed)
    check.at_least("--k", k, 0), check.at_least("--n-test", n_test, 1)
    check.at_least("--max-len", max_len, 1), check.dtype(dtype), check.device(device), check.out_dir(out)
    check.text("--separator", separator)
    batch = check.batch_size(batch_size)
    job = EvalJob(model=model, task=task, task_spec=task_spec, n_test=n_test, data_dir=data_dir, dtype=dtype,
                  device=device, bos=bos, seeds=seed_list,
                  eval=EvalConfig(k=k, seed=seed_list[0], balanced=balanced, separator=separator, max_len=max_len,
                                  batch_size=batch))
    if out is not None:
        refuse_existing([out / "results.json"], overwrite)
    with lock(out) if out is not None else _nothing():
        doc = run(job, progress=progress())
        if out is not None:
            path = write(doc, out)
    print_table(summary_rows(doc), list(SUMMARY))
    if out is not None:
        typer.echo(f"wrote {path}")


@app.command("compare")
@user_errors
def compare_cmd(
    model: str = MODEL_OPT,
    task: str = typer.Option("sst2", "--tasks", "--task", help="task name, comma list, or 'all'"),
    task_spec: Path = TASK_SPEC_OPT,
    k: int = typer.Option(32, help="demonstrations (>= 1: finetuning needs at least one)"),
    seeds: str = typer.Option("1", help=f"{SEEDS_HELP}: mean and 95% bootstrap CI over seeds"),
    n_test: int = typer.Option(None, help="evaluate only the first N test examples"),
    lr: float = typer.Option(None, help="FT learning rate (default: the paper's per-task rate)"),
    lr_search: bool = flag("pick the rate from a grid on held-out train examples", "--lr-search"),
    ft_params: str = typer.Option("kv", help="kv (the paper) or all (full-model control)"),
    ft_mode: str = typer.Option("gd", help="gd or lcgd (layer-causal GD, Deutch et al. 2024)"),
    position: str = typer.Option("last", help="last prompt token, or label-token (the official code)"),
    untrained: bool = flag("also run the untrained-model control", "--untrained"),
    untrained_seed: int = typer.Option(None, help="init seed of the untrained control for every run seed "
                                                  "(default: the run seed)"),
    kendall_n: int = typer.Option(100, help="test examples of the Kendall rank correlation (>= 1)"),
    simam_segment: str = typer.Option("after-context", help="after-context (the paper's code: every position after "
                                                            "the context) or input-only (the test input's tokens)"),
    kendall_scale: str = typer.Option("paper", help="FT-side logits: paper (head_dim^-1 · q·q) or none (q·q)"),
    updates_n: int = typer.Option(100, help="test examples on which ΔW_ICL is compared with ΔW_FT (0: skip)"),
    balanced: bool = BALANCED_OPT,
    separator: str = SEPARATOR_OPT,
    max_len: int = typer.Option(2048, help="context limit in tokens"),
    batch_size: str = BATCH_SIZE_OPT,
    data_dir: Path = DATA_DIR_OPT,
    dtype: str = DTYPE_OPT,
    device: str = DEVICE_OPT,
    bos: str = typer.Option(None, help="start token of every prompt: a token of the vocabulary "
                                       "(default: the model's, e.g. <|endoftext|> for SmolLM2, <bos> for Gemma)"),
    out: Path = typer.Option(None, help="write results.json, records.jsonl and per-layer plots here"),
    overwrite: bool = flag(OVERWRITE_HELP, "--overwrite"),
):
    """ZSL vs ICL vs K/V finetuning on the same demonstrations, with Rec2FTP, SimAOU, SimAM and Kendall."""
    import pandas as pd

    from iclgd.experiments.compare import CompareConfig, CompareJob, run, write
    from iclgd.report.plots import plot_compare_file
    from iclgd.report.tables import compare_rows

    seed_list = int_list(seeds, "--seeds")
    check.seed_list("--seeds", seed_list), check.at_least("--k", k, 1), check.at_least("--n-test", n_test, 1)
    check.positive_float("--lr", lr), check.at_least("--kendall-n", kendall_n, 1)
    check.at_least("--max-len", max_len, 1), check.dtype(dtype), check.device(device), check.out_dir(out)
    check.text("--separator", separator)
    batch = check.batch_size(batch_size)
    no_start_token(bos)
    cfg = CompareConfig(k=k, lr=lr, lr_search=lr_search, ft_params=ft_params, ft_mode=ft_mode, position=position,
                        kendall_n=kendall_n, simam_segment=simam_segment, kendall_scale=kendall_scale,
                        updates_n=updates_n, untrained_seed=untrained_seed, balanced=balanced, separator=separator,
                        max_len=max_len, batch_size=batch)
    job = CompareJob(model=model, task=task, seeds=seed_list, n_test=n_test, untrained=untrained,
                     task_spec=task_spec, data_dir=data_dir, dtype=dtype, device=device, bos=bos, compare=cfg)
    if out is not None:
        refuse_existing([out / "results.json"], overwrite)
    rows = []
    with lock(out) if out is not None else _nothing():
        for r in run(job, progress=progress()):
            rows += compare_rows(r.doc)
            if out is not None:
                plot_compare_file(write(r, out))
    typer.echo(f"prediction position: {position}; FT: {ft_params} params, {ft_mode}")
    typer.echo(pd.DataFrame(rows).to_string(index=False))
    if out is not None:
        typer.echo(f"wrote results.json, records.jsonl and per-layer plots under {out}")


@app.command("pretrain")
@user_errors
def pretrain_cmd(
    corpus: str = typer.Option("tinyshakespeare", help="tinyshakespeare, austen, kjv, a text file, or hf:DATASET"),
    attention: str = typer.Option("vanilla", help="vanilla or momentum"),
    eta: float = ETA_OPT,
    learnable_eta: bool = flag("learn eta per head (sigmoid-parameterised, starting from --eta)", "--learnable-eta"),
    config: str = typer.Option("small", "--size", help="model size: tiny or small"),
    config_old: str = typer.Option(None, "--config", hidden=True, help="old name of --size"),
    steps: int = typer.Option(150, help="optimizer steps (>= 1)"),
    seed: int = typer.Option(1, help="seed of the initialization and the data order"),
    data_dir: Path = typer.Option(None, help="data directory holding the corpora"),
    out: Path = typer.Option(..., help="run folder (resumes if it holds a checkpoint of the same configuration)"),
    overwrite: bool = flag("start over in a folder that holds a run of another configuration", "--overwrite"),
):
    """Train a small Llama-style LM from scratch, with vanilla or momentum attention."""
    from iclgd.engine.train import SIZES as TRAIN_SIZES
    from iclgd.engine.train import TrainConfig, check_run_folder, pretrain

    config, size_opt = old_name("--size", config, "small", "--config", config_old)
    check.one_of(size_opt, config, tuple(TRAIN_SIZES))
    check.seed("--seed", seed), check.out_dir(out)
    cfg = TrainConfig(corpus=corpus, attention=attention, eta=eta, learnable_eta=learnable_eta, size=config,
                      steps=steps, seed=seed)
    cfg.check()
    with lock(out):
        check_run_folder(cfg, out, data_dir, overwrite)
        r = pretrain(cfg, out, data_dir, progress=progress())
    typer.echo(f"final train loss {r['final_train_loss']:.4f}; log in {out / 'log.csv'}")


momentum_app = typer.Typer(no_args_is_help=True, help="Momentum attention: training study and zero-training probe.")
app.add_typer(momentum_app, name="momentum")


@momentum_app.command("compare")
@user_errors
def momentum_compare(
    corpus: str = typer.Option("tinyshakespeare", help="tinyshakespeare, austen, kjv, a text file, or hf:DATASET"),
    seeds: str = typer.Option("1,2,3", help=f"{SEEDS_HELP} (one vanilla and one momentum run each)"),
    eta: float = ETA_OPT,
    learnable_eta: bool = flag("learn eta per head (sigmoid-parameterised, starting from --eta)", "--learnable-eta"),
    config: str = typer.Option("small", "--size", help="model size: tiny or small"),
    config_old: str = typer.Option(None, "--config", hidden=True, help="old name of --size"),
    steps: int = typer.Option(150, help="optimizer steps per run (>= 1)"),
    lengths: str = typer.Option("128,256,512", help="comma list of distinct context lengths for perplexity"),
    data_dir: Path = typer.Option(None, help="data directory holding the corpora"),
    out: Path = typer.Option(..., help="folder of the runs, results.json and val_curves.png"),
    overwrite: bool = flag(OVERWRITE_HELP, "--overwrite"),
):
    """Train vanilla and momentum per seed (same init and data order); perplexity and ICL side by side."""
    from iclgd.engine.train import SIZES as TRAIN_SIZES
    from iclgd.engine.train import TrainConfig

    config, size_opt = old_name("--size", config, "small", "--config", config_old)
    check.one_of(size_opt, config, tuple(TRAIN_SIZES))
    seed_list, length_list = int_list(seeds, "--seeds"), tuple(int_list(lengths, "--lengths"))
    check.seed_list("--seeds", seed_list), check.distinct("--lengths", list(length_list)), check.out_dir(out)
    for L in length_list:
        check.at_least("--lengths", L, 2)
    TrainConfig(corpus=corpus, attention="momentum", eta=eta, learnable_eta=learnable_eta, size=config,
                steps=steps).check()
    import pandas as pd

    from iclgd.experiments.momentum import MomentumConfig, run, write
    from iclgd.report.plots import plot_curves
    from iclgd.report.tables import momentum_rows

    cfg = MomentumConfig(corpus=corpus, seeds=seed_list, eta=eta, size=config, steps=steps, lengths=length_list,
                         learnable_eta=learnable_eta, data_dir=data_dir)
    old = read_json_object(out / "results.json", "momentum results file", ("config",))
    if old is not None and not overwrite:  # checked before any training
        new = {"corpus": corpus, "seeds": seed_list, "eta": eta, "learnable_eta": learnable_eta, "size": config,
               "steps": steps, "lengths": list(length_list)}
        differ = differing_keys({k: old["config"].get(k) for k in new}, new)
        if differ:
            raise IclgdError(f"{out / 'results.json'}: from a run of another configuration (differs in "
                             f"{', '.join(differ)}); use another --out, or --overwrite to replace it")
    with lock(out):
        doc = run(cfg, out, progress=progress())
        path = write(doc, out)
    plot_curves(out, seed_list)
    typer.echo(f"{len(seed_list)} seeds, mean [95% bootstrap CI]")
    typer.echo(pd.DataFrame(momentum_rows(doc)).to_string(index=False))
    typer.echo(f"wrote {path} and {out / 'val_curves.png'}")


@momentum_app.command("apply")
@user_errors
def momentum_apply(
    model: str = MODEL_OPT,
    eta: float = ETA_OPT,
    corpus: str = typer.Option("austen", help="corpus of the perplexity: tinyshakespeare, austen, kjv or a file"),
    task: str = typer.Option("all", "--tasks", "--task", help="task name, comma list, or 'all'"),
    n_test: int = typer.Option(50, help="test examples per task (>= 1)"),
    k: int = typer.Option(8, help="demonstrations per prompt (>= 0)"),
    data_dir: Path = DATA_DIR_OPT,
    out: Path = typer.Option(None, help="write momentum_apply.json here"),
    overwrite: bool = flag(OVERWRITE_HELP, "--overwrite"),
):
    """Add the EMA to a pretrained model without training: perplexity and ICL accuracy vs vanilla."""
    from iclgd.experiments.momentum import apply_pretrained

    if not 0 < eta < 1:
        raise IclgdError(f"--eta {eta}: expected a momentum coefficient strictly between 0 and 1")
    check.at_least("--n-test", n_test, 1), check.at_least("--k", k, 0), check.out_dir(out)
    if out is not None:
        refuse_existing([out / "momentum_apply.json"], overwrite)
    with lock(out) if out is not None else _nothing():
        doc = apply_pretrained(model, eta, corpus, task, n_test, k, data_dir=data_dir, out=out)
    import pandas as pd

    r = doc["results"]
    rows = [{"metric": f"ppl@{L}", "vanilla": r["vanilla"]["ppl"][L], "momentum": r["momentum"]["ppl"][L]}
            for L in r["vanilla"]["ppl"]]
    rows += [{"metric": f"ICL acc {t}", "vanilla": r["vanilla"]["icl"][t], "momentum": r["momentum"]["icl"][t]}
             for t in r["vanilla"]["icl"]]
    typer.echo(f"{model}, eta {eta}, no training; perplexity on {corpus} test; ICL k={k}, n={n_test}")
    typer.echo(pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.4g}"))


@app.command("synthetic")
@user_errors
def synthetic_cmd(
    layers: int = typer.Option(1, "--n-layers", help="number of attention layers (>= 1)"),
    layers_old: int = typer.Option(None, "--layers", hidden=True, help="old name of --n-layers"),
    dim: int = typer.Option(10, help="input dimension of the regression tasks (>= 1)"),
    n_context: int = typer.Option(20, help="in-context examples per task (>= 1)"),
    steps: int = typer.Option(2000, help="training steps (>= 1)"),
    seeds: str = typer.Option(None, help=f"seeds of the training and evaluation tasks: {SEEDS_HELP} (several: a "
                                         "table of means with 95% bootstrap CIs) [default: 1]"),
    seed: int = OLD_SEED_OPT,
    n_eval: int = typer.Option(2048, help="fresh tasks of the evaluation (>= 2)"),
    lr: float = typer.Option(1e-3, help="Adam learning rate of the training"),
    attention: str = typer.Option("linear", help="linear (LSA, has an exact GD construction) or softmax"),
    heads: int = typer.Option(1, help="attention heads per layer (>= 1)"),
    mlp_hidden: int = typer.Option(0, help="width of an MLP after each attention layer (0: none)"),
    out: Path = typer.Option(None, help="write results.json (or seed-*/ and summary.json) and plots here"),
    overwrite: bool = flag(OVERWRITE_HELP, "--overwrite"),
):
    """In-context linear regression: a trained attention model vs GD, and the metrics' calibration."""
    import pandas as pd

    from iclgd.experiments import synthetic as S
    from iclgd.report.plots import plot_calibration, plot_synthetic
    from iclgd.report.tables import calibration_table, summary_table

    seed_list = seeds_of(seeds, seed)
    layers, layers_opt = old_name("--n-layers", layers, 1, "--layers", layers_old)
    for opt, v, low in ((layers_opt, layers, 1), ("--dim", dim, 1), ("--n-context", n_context, 1),
                        ("--steps", steps, 1), ("--n-eval", n_eval, 2), ("--heads", heads, 1),
                        ("--mlp-hidden", mlp_hidden, 0)):
        check.at_least(opt, v, low)
    check.positive_float("--lr", lr), check.out_dir(out)
    if out is not None:
        refuse_existing([out / "results.json", out / "summary.json"], overwrite)
    runs = [S.run(S.SyntheticConfig(dim, n_context, layers, steps, s, n_eval, lr=lr, attention=attention, heads=heads,
                                    mlp_hidden=mlp_hidden), progress=progress()) for s in seed_list]
    for r in runs:
        typer.echo(f"seed {r['config']['seed']}: {r['config']['model']}; losses on {n_eval} fresh tasks "
                   "(mean squared error of the query prediction):")
        typer.echo(pd.DataFrame([r["loss"]]).T.rename(columns={0: "mse"}).to_string(float_format=lambda x: f"{x:.4g}"))
        typer.echo(f"trained vs {layers}-step GD: prediction mse {r['trained_vs_gd']['pred_mse']:.4g}, "
                   f"sensitivity cosine {r['trained_vs_gd']['sensitivity_cos']:.4f}")
        typer.echo(f"calibration against {layers}-step GD (each metric beside its random baseline):")
        typer.echo(pd.DataFrame(calibration_table(r)).to_string(index=False))
    summary = S.summarize_seeds(runs) if len(runs) > 1 else None
    if summary is not None:
        typer.echo(f"over seeds {summary['seeds']}: mean [95% bootstrap CI]")
        typer.echo(pd.DataFrame(summary_table(summary)).to_string(index=False))
    if out is not None:
        if summary is None:
            S.write(runs[0], out)
            plot_synthetic(runs[0], S.summarize_seeds(runs), out)
            typer.echo(f"wrote {out / 'results.json'}, loss.png, sensitivities.png, calibration.png")
        else:
            S.write_seeds(runs, summary, out)
            for r in runs:
                plot_synthetic(r, S.summarize_seeds([r]), out / f"seed-{r['config']['seed']}")
            plot_calibration(summary, out / "calibration.png", runs[0]["config"]["model"])
            typer.echo(f"wrote {out}/seed-*/, {out / 'summary.json'}, {out / 'calibration.png'}")


@app.command("reproduce")
@user_errors
def reproduce_cmd(
    model: str = MODEL_OPT,
    tasks: str = typer.Option("all", "--tasks", "--task", help="task name, comma list or 'all'"),
    seeds: str = typer.Option("1", help=f"{SEEDS_HELP} (one compare unit per task and seed)"),
    n_test: int = typer.Option(200, help="test examples per task (>= 1)"),
    k: int = typer.Option(32, help="demonstrations (>= 1)"),
    untrained: bool = typer.Option(True, help="the untrained-model control units", metavar=""),
    dual: bool = typer.Option(True, help="the dual-form check unit", metavar=""),
    synthetic: bool = typer.Option(True, help="the synthetic calibration unit", metavar=""),
    momentum: bool = flag("also train vanilla vs momentum LMs (minutes per seed)", "--momentum"),
    preset: str = typer.Option(None, help="demo: sst2 and cb, 100 test examples, one seed, a demo-size world "
                                          "(<= 15 min on 2 cores); world: the ICL world's three experiments on models "
                                          "trained here (<= 45 min)"),
    shard: str = typer.Option(None, help="i/n: process i of n sharing the sweep's unit queue (job arrays)"),
    dtype: str = DTYPE_OPT,
    device: str = DEVICE_OPT,
    device_map: str = typer.Option(None, help="'auto': spread a large model over the GPUs (HF Accelerate; "
                                              "needs --device cuda)"),
    bos: str = typer.Option(None, help="start token of every prompt: a token of the vocabulary "
                                       "(default: the model's, e.g. <|endoftext|> for SmolLM2, <bos> for Gemma)"),
    data_dir: Path = typer.Option(None, help="data directory (recorded with its checksums in sweep.json)"),
    out: Path = typer.Option(Path("runs/repro"), help="the sweep folder (resumes a run of the same configuration)"),
    overwrite: bool = flag("discard the finished units of another configuration in --out", "--overwrite"),
    eval_only: bool = typer.Option(False, "--eval-only", help="ZSL/ICL accuracy units (one ZSL per task, one ICL per "
                                                             "task and seed) instead of compare units; any causal LM"),
    batch_size: str = BATCH_SIZE_OPT,
):
    """The paper's analyses as resumable units (model x task x seed), then report.md from their results."""
    from iclgd.core.models import check_model
    from iclgd.experiments.sweep import SweepConfig, check_units, parse_shard, reproduce
    from iclgd.report import write_report

    seed_list = int_list(seeds, "--seeds")
    check.seed_list("--seeds", seed_list), check.at_least("--n-test", n_test, 1), check.at_least("--k", k, 1)
    check.dtype(dtype), check.device(device)
    from iclgd.core.models import resolve_device

    device = resolve_device(device)  # the sweep records the device applied
    check.device_map(device_map, device), check.out_dir(out)
    batch = check.batch_size(batch_size)
    no_start_token(bos)
    cfg = SweepConfig(model=model, tasks=tasks.split(",") if tasks != "all" else ["all"], seeds=seed_list,
                      n_test=n_test, k=k, untrained=untrained, dual=dual, synthetic=synthetic, momentum=momentum,
                      dtype=dtype, device=device, device_map=device_map, bos=bos, eval_only=eval_only,
                      batch_size=batch)
    if preset is not None:
        cfg.apply_preset(preset)
    i, n = parse_shard(shard)
    if cfg.tasks:  # the model is known and readable before the sweep folder is written
        check_model(cfg.model, need_layout=not cfg.eval_only)
    with lock(out, f"shard-{i}-of-{n}"):
        r = reproduce(cfg, out, data_dir, shard, progress=progress(), overwrite=overwrite)
    done = (f"{r['ran']} units run by process {r['process']}, {r['skipped']} already finished, {r['elsewhere']} taken "
            f"by other processes (of {r['units']})")
    if r["unfinished"]:  # the process that finishes the last unit writes the report
        typer.echo(f"{done}; {len(r['unfinished'])} still running elsewhere, so no report yet (the last process to "
                   f"finish writes it; or run `iclgd report {out}`)")
        return
    with lock(out, "report", wait=True):  # one report writer: a second process finding it written skips
        check_units(out)
        fresh = report_is_fresh(out)
        report = out / "report.md" if fresh else write_report(out)
    typer.echo(f"{done}; report: {report}" + (" (written by another process)" if fresh else ""))


def report_is_fresh(out: Path) -> bool:
    """report.md is newer than sweep.json (rewritten by every reproduce start) and than every unit result."""
    rep = out / "report.md"
    if not rep.is_file():
        return False
    newest = max([(out / "sweep.json").stat().st_mtime_ns,
                  *(f.stat().st_mtime_ns for f in (out / "units").glob("*/result.json"))])
    return rep.stat().st_mtime_ns > newest


@app.command("report")
@user_errors
def report_cmd(out: Path = typer.Argument(..., help="a reproduce folder (holding sweep.json and units/)")):
    """Regenerate report.md, results.csv and plots from a reproduce folder's results files alone."""
    from iclgd.report import write_report

    from iclgd.experiments.sweep import check_units

    if not (out / "sweep.json").is_file():
        raise IclgdError(f"{out}: not a reproduce folder (no sweep.json)")
    check.out_dir(out, "report")
    check_units(out)
    with lock(out, "report"):
        typer.echo(f"wrote {write_report(out)}")


dual_app = typer.Typer(no_args_is_help=True, help="The dual form between attention and gradient descent.")
app.add_typer(dual_app, name="dual")


@dual_app.command("verify")
@user_errors
def dual_verify(
    model: str = MODEL_OPT,
    task: str = typer.Option("sst2", "--tasks", "--task", help="task name (one: the check runs on one prompt)"),
    task_spec: Path = typer.Option(None, help="JSON spec of a user task (e.g. an ICL-world task) instead of --tasks"),
    k: int = typer.Option(8, help="demonstrations in the prompt (>= 1)"),
    seeds: str = typer.Option(None, help="seed of the demonstration shuffle (one: the check runs on one prompt) "
                                         "[default: 1]"),
    seed: int = OLD_SEED_OPT,
    layers: str = typer.Option("all", help="layer indices: 'all' or a comma list, e.g. 0,3"),
    dtype: str = typer.Option("float64", help="float64 (tolerance 1e-5) or float32 (1e-3)"),
    device: str = DEVICE_OPT,
    data_dir: Path = DATA_DIR_OPT,
    json_out: bool = flag("print the per-head rows as JSON", "--json"),
    bos: str = typer.Option(None, help="start token of every prompt: a token of the vocabulary "
                                       "(default: the model's, e.g. <|endoftext|> for SmolLM2, <bos> for Gemma)"),
    out: Path = typer.Option(None, help="write dual_verify.json and dual_verify.png here"),
    overwrite: bool = flag(OVERWRITE_HELP, "--overwrite"),
):
    """Check ICL = (W_ZSL + ΔW_ICL) q on every layer and head of a real model, and measure the softmax gap."""
    import json

    from iclgd.experiments.dual import VerifyConfig, verify, write_verify
    from iclgd.report.plots import plot_verify

    no_start_token(bos)
    seed = one_seed(seeds_of(seeds, seed), "dual verify")
    check.at_least("--k", k, 1), check.dtype(dtype, ("float64", "float32")), check.device(device)
    check.out_dir(out)
    cfg = VerifyConfig(model=model, task=task, k=k, seed=seed, layers=layers, dtype=dtype, data_dir=data_dir, bos=bos,
                       task_spec=task_spec, device=device)
    if out is not None:
        refuse_existing([out / "dual_verify.json"], overwrite)
    r = verify(cfg)
    summary, meta = r["summary"], r["config"]
    if json_out:
        typer.echo(json.dumps({"summary": summary, "rows": r["rows"]}, indent=1))
    else:
        print_table(r["per_layer"], ["layer", "identity_max", "recon_max", "dW/WZSL", "softmax_relerr", "softmax_cos"])
        typer.echo(f"{model} {meta['task']} k_true={meta['k_true']} tokens={meta['n_tokens']} {dtype}: identity max "
                   f"{summary['identity_max']:.2e} (tolerance {summary['tolerance']:g}: "
                   f"{'OK' if summary['within_tolerance'] else 'FAILED'}); median over layers: "
                   f"softmax cos {summary['median_softmax_cos']:.4f}, rel. error "
                   f"{summary['median_softmax_relerr']:.4g}, ‖ΔW_ICL‖/‖W_ZSL‖ {summary['median_dW_ratio']:.4g}")
        if meta.get("sliding_windows"):
            w = meta["sliding_windows"]
            typer.echo(f"sliding-window layers {','.join(map(str, w))} (window {sorted(set(w.values()))}): "
                       "their sums cover only the last tokens of the window")
    if out is not None:
        path = write_verify(r, out)
        plot_verify(r["per_layer"], out / "dual_verify.png", f"{model} · {meta['task']} · k={meta['k_true']} · {dtype}")
        typer.echo(f"wrote {path} and {out / 'dual_verify.png'}")
    if not summary["within_tolerance"]:
        raise typer.Exit(1)


@dual_app.command("compare-updates")
@user_errors
def dual_compare_updates(
    before: str = typer.Option(..., help="model (name or folder) before finetuning"),
    after: str = typer.Option(..., help="model folder after K/V finetuning, or a state-dict file (.pt/.safetensors)"),
    task: str = typer.Option("sst2", "--tasks", "--task", help="task name (one: the comparison runs on one prompt)"),
    k: int = typer.Option(8, help="demonstrations in the prompt (>= 1)"),
    seeds: str = typer.Option(None, help="seed of the demonstration shuffle (one) [default: 1]"),
    seed: int = OLD_SEED_OPT,
    data_dir: Path = DATA_DIR_OPT,
    out: Path = typer.Option(None, help="write the per-layer comparison (dual_updates.json) here"),
    overwrite: bool = flag(OVERWRITE_HELP, "--overwrite"),
):
    """Compare ΔW_FT = W_ZSL(after) − W_ZSL(before) with ΔW_ICL, per layer (LMOps issue #22)."""
    import pandas as pd

    from iclgd.experiments.dual import compare_updates, write_updates

    seed = one_seed(seeds_of(seeds, seed), "dual compare-updates")
    check.at_least("--k", k, 1), check.out_dir(out)
    if out is not None:
        refuse_existing([out / "dual_updates.json"], overwrite)
    r = compare_updates(before, after, task, k, seed, data_dir)
    table = pd.DataFrame(r["rows"]).groupby("layer")[["cos_dW", "norm_ratio_ft_over_icl", "cos_effect_on_q"]].median()
    typer.echo(table.reset_index().to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    if out is not None:
        write_updates(r, out)


# ----------------------------------------------------------------------------- the ICL world

world_app = typer.Typer(no_args_is_help=True, help="The ICL world: few-shot classification models trained here.")
app.add_typer(world_app, name="world")


@world_app.command("train")
@user_errors
def world_train(
    attention: str = typer.Option("vanilla", help="vanilla or momentum"),
    eta: float = typer.Option(0.9, help="momentum coefficient (fixed, or the initial value with --learnable-eta)"),
    learnable_eta: bool = flag("learn eta per head (sigmoid-parameterised, starting from --eta)", "--learnable-eta"),
    seed: int = typer.Option(1, help="initialisation and data order"),
    size: str = typer.Option("default", help="default (the ICL >= 0.9 goal), demo (<= 3 min) or tiny (tests)"),
    steps: int = typer.Option(None, help="training steps (default: the size's)"),
    world_seed: int = typer.Option(0, help="the world: prototypes and evaluation tasks"),
    ckpt_every: int = typer.Option(None, help="resume state and an HF checkpoint every N steps"),
    threads: int = typer.Option(None, help="torch threads (default 1: faster than 2 on shared cores)"),
    out: Path = typer.Option(..., help="world folder (resumes if it holds a checkpoint)"),
):
    """Train a world model; writes DIR/model (HF folder), DIR/tasks, DIR/data, DIR/checkpoints, DIR/log.csv."""
    from iclgd.engine.world import sized, train

    check.seed("--seed", seed), check.seed("--world-seed", world_seed), check.at_least("--steps", steps, 1)
    check.at_least("--ckpt-every", ckpt_every, 1), check.at_least("--threads", threads, 1), check.out_dir(out)
    over = {k: v for k, v in dict(steps=steps, ckpt_every=ckpt_every, threads=threads).items() if v is not None}
    cfg = sized(size, attention=attention, eta=eta, learnable_eta=learnable_eta, seed=seed, world_seed=world_seed,
                **over)
    cfg.check()
    with lock(out):
        r = train(cfg, out, progress=progress())
    f = r["final"]
    typer.echo(f"step {cfg.steps}: ICL acc {f['icl_acc']:.3f}, ZSL acc {f['zsl_acc']:.3f} (chance "
               f"{1 / cfg.world.n_labels:.3f}), eval loss {f['eval_loss']:.4f}, {f['wall_s']:.0f} s")
    typer.echo(f"wrote {out / 'model'}, {out / 'tasks'}, {out / 'data'}, {out / 'log.csv'}")


@world_app.command("tasks")
@user_errors
def world_tasks(
    out: Path = typer.Argument(..., help="a world folder (its world.json is used), or a new folder"),
    world_seed: int = typer.Option(0, help="for a folder without world.json"),
):
    """Write the world's evaluation tasks: DIR/tasks/world-T.json and DIR/data/world-T/{demo,eval}.jsonl."""
    from iclgd.engine.world import write_world_tasks

    check.seed("--world-seed", world_seed), check.out_dir(out, "DIR")
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
