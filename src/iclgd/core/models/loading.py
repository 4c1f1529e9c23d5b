"""Loading a model by name (registry, tiny config, local folder or hub id) or from objects, checking ``--model``
before its weights load, devices, and what every result records of its run."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from iclgd.core import allocator
from iclgd.core.errors import IclgdError
from iclgd.core.models.attention import check_layout, gqa_state
from iclgd.core.models.layout import check_dtype, derive_layout, layout_for_config
from iclgd.core.models.loaded import LoadedModel
from iclgd.core.models.offline import REGISTRY
from iclgd.core.models.tiny import build_tiny, tiny_configs

# Set by iclgd.engine.momentum when it is imported (the engine layer owns momentum attention), through
# :func:`register_momentum_restore`: gives a model saved with it (config.momentum_eta, e.g. an
# `iclgd world train --attention momentum` folder) its momentum back.
_RESTORE_MOMENTUM: Callable | None = None


def register_momentum_restore(fn: Callable) -> None:
    """Register ``fn(lm, folder)``, which gives a model saved with momentum attention its momentum back when
    :func:`load_model` loads it (iclgd.engine.momentum registers its own on import)."""
    global _RESTORE_MOMENTUM
    _RESTORE_MOMENTUM = fn


def _torch_dtype(dtype: str) -> torch.dtype:
    t = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    if not isinstance(t, torch.dtype):
        raise IclgdError(f"--dtype {dtype!r}: unknown dtype (expected float32, float64, bfloat16 or float16)")
    return t


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_model_folder(folder: Path) -> None:
    """A local model folder holds a config.json with a model_type, weights and a tokenizer (one line if not)."""
    import json

    if not any(folder.iterdir()):
        raise IclgdError(f"--model {folder}: the folder is empty (expected config.json, weights and a tokenizer)")
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise IclgdError(f"--model {folder}: no config.json (expected a Hugging Face model folder)")
    try:
        doc = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IclgdError(f"{cfg}: not valid JSON ({getattr(e, 'msg', 'not UTF-8')})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("model_type"), str):
        raise IclgdError(f"{cfg}: field model_type is missing (expected e.g. \"llama\")")


def check_model_files(folder: Path) -> None:
    """Weights and a tokenizer beside the config (checked once the family is known to be supported)."""
    if not any((folder / f).is_file() for f in WEIGHT_FILES) and not list(folder.glob("*.safetensors")):
        raise IclgdError(f"--model {folder}: no weights (expected {' or '.join(WEIGHT_FILES[::2])})")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise IclgdError(f"--model {folder}: no tokenizer (expected {' or '.join(TOKENIZER_FILES)})")


def placement(device: str, device_map: str | dict | None) -> tuple[str, str | dict | None]:
    """This process's device and device map. Under ``accelerate launch`` or torchrun (LOCAL_RANK set, several
    processes on the node) ``--device cuda`` means each process its own GPU ``cuda:LOCAL_RANK``, with
    ``--device-map auto`` too (each rank's model must then fit one GPU); a single process keeps them as given."""
    rank = os.environ.get("LOCAL_RANK")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    if device == "cuda" and rank is not None and local > 1:
        device = f"cuda:{rank}"
        if device_map == "auto":
            device_map = {"": device}
    return device, device_map


def deterministic(device: str) -> None:
    """Deterministic kernels on GPU (cuBLAS workspace, no TF32, no cuDNN autotuning; a nondeterministic op warns).
    The flags in force are recorded beside every result (:func:`hardware`)."""
    if not str(device).startswith("cuda"):
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before the first matmul
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def resolve_device(device: str) -> str:
    """``--device auto``: CUDA when present, then Apple's MPS, else the CPU; any other value as given. Results
    record the device this returns (the one applied), never 'auto'."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def hub_offline() -> bool:
    """Whether the Hugging Face hub is off (``HF_HUB_OFFLINE=1``, which ``iclgd --offline`` sets)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "on", "yes", "true")


def model_config(name: str):
    """(folder or hub id, source, config) of a registry name, local folder or hub id, without loading weights;
    a config that cannot be read is a one-line error that says whether the hub was off. A registry model is
    converted into the cache here on its first use. Any other name is a hub id: ``owner/name`` or a legacy
    one-part id such as ``gpt2``."""
    from transformers import AutoConfig

    if name in REGISTRY:
        folder, source = REGISTRY[name].folder(), REGISTRY[name].source
    elif Path(name).is_dir():
        check_model_folder(Path(name))
        folder, source = Path(name), f"local folder {Path(name).resolve()}"
    elif name.startswith("tiny-random-"):
        raise IclgdError(f"--model {name!r}: unknown tiny model (expected one of {', '.join(tiny_configs())})")
    elif Path(name).exists() or name.startswith((".", "/", "~")) or not name.strip():
        raise IclgdError(f"--model {name!r}: not a model folder (expected one of {', '.join(REGISTRY)}, "
                         "tiny-random-*, a local folder, or a hub id)")
    else:
        folder, source = name, f"hub {name}"
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        known = f"{', '.join(REGISTRY)}, tiny-random-*, a local folder"
        if isinstance(folder, str) and hub_offline():
            raise IclgdError(f"--model {name!r}: unknown model offline: not {known}, nor in the local hub cache, and "
                             "the hub is off (HF_HUB_OFFLINE=1 or --offline; run once online to download it)") from None
        if isinstance(folder, str):
            raise IclgdError(f"--model {name!r}: unknown model: not {known}, nor a hub model that could be "
                             f"reached ({first})") from None
        raise IclgdError(f"--model {name!r}: cannot read its config ({first})") from None
    return folder, source, config


def check_model(name: str, need_layout: bool = True) -> None:
    """What can be known of ``--model`` before its weights load or any file is written: that it exists, its config
    reads, and (``need_layout``) its attention layout can be derived from the config."""
    if name in tiny_configs():
        return
    _, _, config = model_config(name)
    if need_layout:
        layout_for_config(config)


def from_objects(model: nn.Module, tokenizer, name: str | None = None, bos: str | None = None,
                 need_layout: bool = True, source: str | None = None) -> LoadedModel:
    """A :class:`LoadedModel` from a Hugging Face causal LM object and its tokenizer, as a researcher holds them in
    a notebook. The attention layout is derived from the object's modules and checked against its own attention
    (as for a model loaded by name). ``need_layout=False`` keeps a family without a layout for ZSL/ICL accuracy
    only. The weights are used as they are, not copied or moved; the object is put in eval mode, and a family
    whose layout needs another attention implementation (eager for soft-capping) is switched to it."""
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise IclgdError(f"model: expected a Hugging Face causal LM object (got {type(model).__name__})")
    allocator.tune()
    if tokenizer is None or not callable(getattr(tokenizer, "convert_tokens_to_ids", None)):
        raise IclgdError(f"tokenizer: expected the model's Hugging Face tokenizer (got {type(tokenizer).__name__})")
    name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
    try:
        layout = derive_layout(model)
    except IclgdError:
        if need_layout:
            raise
        layout = None
    if layout is not None and getattr(model.config, "_attn_implementation", None) != layout.attn_implementation:
        model.set_attn_implementation(layout.attn_implementation)
    model.eval()
    lm = LoadedModel(name, model, tokenizer, layout, source or f"Python object {type(model).__name__}")
    _check_or_drop_layout(lm, need_layout)
    lm.set_start(bos)
    return lm


def _check_or_drop_layout(lm: LoadedModel, need_layout: bool) -> None:
    """A derived layout must reproduce the model's own attention (:func:`check_layout`); one that does not is
    refused, or with ``need_layout=False`` dropped (the model then serves ZSL/ICL accuracy only)."""
    if lm.layout is None:
        return
    try:
        check_layout(lm)
    except IclgdError:
        if need_layout:
            raise
        lm.layout = None


def as_loaded(model, **load_kw) -> LoadedModel:
    """``model`` as a :class:`LoadedModel`: one already loaded is used as it is, a name is loaded with ``load_kw``."""
    if isinstance(model, LoadedModel):
        return model
    if not isinstance(model, (str, Path)):
        raise IclgdError(f"model: expected a name, a folder or a LoadedModel (got {type(model).__name__}; wrap an "
                         "HF model object with iclgd.load_model(model, tokenizer))")
    return load_model(str(model), **load_kw)


def model_name(model) -> str:
    """What results record as the model: the name given, or a loaded model's own."""
    return model.name if isinstance(model, LoadedModel) else str(model)


def load_model(name: str, dtype: str = "float32", device: str = "cpu", attn_implementation: str | None = None,
               device_map: str | None = None, bos: str | None = None, need_layout: bool = True) -> LoadedModel:
    """``name``: a registry short name, a tiny-random-* config, a local folder, or a hub id.

    ``device_map="auto"`` spreads a model too large for one GPU over the available devices (HF Accelerate).
    ``bos``: the prompts' start token (``--bos``): None for the registry's (else the tokenizer's BOS, else its
    EOS), 'none' for no start token, or a token of the vocabulary. ``need_layout=False`` (ZSL/ICL accuracy) loads
    any ``AutoModelForCausalLM``, also of a family the adapter table lacks; captures, finetuning and the dual form
    need its attention layout, so by default such a family is refused before its weights load.
    """
    torch_dtype = _torch_dtype(dtype)
    allocator.tune()  # before the weights and every buffer after them (core/allocator.py)
    device, device_map = placement(resolve_device(device), device_map)
    deterministic(device)
    if name in tiny_configs():  # built in fp32 on the CPU; then the requested dtype and device, as for any model
        check_dtype(tiny_configs()[name].model_type, dtype, name)
        lm = build_tiny(name)
        lm.model.to(device=device, dtype=torch_dtype)  # the dtype and device recorded are the ones applied
        lm.set_start(bos)
        return lm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, source, config = model_config(name)
    check_dtype(config.model_type, dtype, name)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or getattr(config, "is_encoder_decoder", False):
        raise IclgdError(f"--model {name}: a {config.model_type!r} model is not a decoder-only causal LM "
                         "(AutoModelForCausalLM does not load it as one); iclgd needs one")
    try:
        layout = layout_for_config(config)
    except IclgdError:
        if need_layout:
            raise
        layout = None
    if isinstance(folder, Path) and name not in REGISTRY:
        check_model_files(folder)
    impl = attn_implementation or (layout and layout.attn_implementation)
    # loaded straight onto the device in the requested dtype (no fp32 copy on the host first)
    kw = {"device_map": device_map or ({"": device} if device != "cpu" else None)}
    if impl:  # a family without a layout keeps transformers' own choice
        kw["attn_implementation"] = impl
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **kw)
    except Exception as e:  # noqa: BLE001 - truncated or damaged weights: the user's file, not an iclgd bug
        if not isinstance(folder, Path):
            raise
        raise IclgdError(f"--model {name}: cannot load its weights ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:160]}); the files may be truncated or damaged") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001
        if not isinstance(folder, Path):
            raise
        raise IclgdError(f"--model {name}: cannot load its tokenizer ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:160]})") from None
    model.eval()
    n_rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_rows:  # ids past the embedding would index out of range (or crash) in the first forward
        raise IclgdError(f"--model {name}: its tokenizer has {len(tokenizer)} tokens but the model's embedding has "
                         f"{n_rows} rows (a tokenizer of another model in the folder?)")
    lm = LoadedModel(name, model, tokenizer, layout, source)
    _check_or_drop_layout(lm, need_layout)
    lm.set_start(REGISTRY[name].bos if name in REGISTRY else None)
    lm.set_start(bos)
    if getattr(model.config, "momentum_eta", None) is not None:  # saved with momentum attention
        if _RESTORE_MOMENTUM is None:
            raise IclgdError(f"--model {name}: saved with momentum attention, which iclgd.engine.momentum restores "
                             "(import it first)")
        _RESTORE_MOMENTUM(lm, folder)  # else it would silently run as vanilla
    return lm


def run_versions() -> dict:
    """What every results file records of its run: library versions, and the hardware with its determinism flags."""
    from iclgd.core.io import library_versions

    return {**library_versions(), "hardware": hardware()}


def hardware() -> dict:
    """CPU threads, GPUs with the driver, CUDA and cuDNN versions, and the flags that decide determinism."""
    hw = {"cpu_threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available(),
          "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
          "allocator": allocator.state() or {"set_by": "nobody (no model was loaded through iclgd)"},
          "grouped_kv_heads": gqa_state()}
    if torch.cuda.is_available():
        hw.update({"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                   "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                   "driver": _nvidia_driver(), "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                   "cudnn_benchmark": torch.backends.cudnn.benchmark,
                   "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")})
    return hw


def _nvidia_driver() -> str:
    import subprocess

    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=20)
        return r.stdout.split()[0] if r.returncode == 0 and r.stdout.split() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
