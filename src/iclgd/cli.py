"""The ``iclgd`` command line: thin wrappers that parse options, call the library, print tables.

Every user-caused error is an :class:`~iclgd.errors.IclgdError`, printed as one line with exit status 2.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

import typer

from iclgd.errors import IclgdError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])


@app.callback()
def _root() -> None:
    """iclgd: in-context learning as implicit gradient descent, measured on real models."""


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1") if os.environ.get("ICLGD_OFFLINE", "1") == "1" else None
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")
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


def print_table(rows: list[dict], columns: list[str]) -> None:
    import pandas as pd

    df = pd.DataFrame(rows, columns=columns)
    typer.echo(df.to_string(index=False, float_format=lambda x: f"{x:.4f}"))


@app.command("eval")
@user_errors
def eval_cmd(
    model: str = typer.Option("smollm2-135m", help="registry name, tiny-random-*, local folder or hub id"),
    task: str = typer.Option("sst2", help="task name, comma list, or 'all'"),
    task_spec: Path = typer.Option(None, help="JSON spec of a user task (template, label_words, files)"),
    k: int = typer.Option(32, help="demonstrations requested (fewer if the context overflows)"),
    seed: int = typer.Option(1, help="seed of the demonstration shuffle"),
    n_test: int = typer.Option(None, help="evaluate only the first N test examples (after the seed-1 shuffle)"),
    balanced: bool = typer.Option(False, help="class-balanced demonstrations (round robin over labels)"),
    separator: str = typer.Option("\n", help="text after each demonstration"),
    max_len: int = typer.Option(2048, help="context limit in tokens (the paper's 2048)"),
    batch_size: int = typer.Option(8),
    data_dir: Path = typer.Option(None, help="data directory (default $ICLGD_DATA_DIR or ../shared/data)"),
    dtype: str = typer.Option("float32"),
    device: str = typer.Option("cpu"),
    out: Path = typer.Option(None, help="write results.json here"),
):
    """Zero-shot and in-context accuracy of a causal LM on the paper's tasks."""
    from iclgd.evaluation import run_eval

    if out is not None:
        from iclgd.io import ensure_dir

        ensure_dir(out)
    rows = run_eval(model=model, task=task, task_spec=task_spec, k=k, seed=seed, n_test=n_test, balanced=balanced,
                    separator=separator, max_len=max_len, batch_size=batch_size, data_dir=data_dir, dtype=dtype,
                    device=device, out=out)
    print_table(rows, ["task", "acc_zsl", "acc_icl", "k_true", "n", "majority_baseline"])
    if out is not None:
        typer.echo(f"wrote {out / 'results.json'}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
