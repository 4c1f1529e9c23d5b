"""Tiny random-weight models of every tested family, built in code (no download)."""

from __future__ import annotations

import torch

from iclgd.core.models.attention import check_layout
from iclgd.core.models.layout import layout_for_config
from iclgd.core.models.loaded import LoadedModel


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

    V, P, W = 259, 4096, 8
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
        # families derived with no entry of their own; small sliding windows so the tests cross them
        "tiny-random-mistral": T.MistralConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                               num_key_value_heads=2, intermediate_size=64, sliding_window=W,
                                               max_position_embeddings=P, **common),
        "tiny-random-qwen3": T.Qwen3Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2, head_dim=8, intermediate_size=64,
                                           max_position_embeddings=P, **common),
        "tiny-random-gemma2": T.Gemma2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, head_dim=16, intermediate_size=64,
                                             query_pre_attn_scalar=24, sliding_window=W, attn_logit_softcapping=5.0,
                                             layer_types=["sliding_attention", "full_attention"],
                                             max_position_embeddings=P, **common),
        "tiny-random-gemma3": T.Gemma3TextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 num_key_value_heads=1, head_dim=16, intermediate_size=64,
                                                 query_pre_attn_scalar=24, sliding_window=W,
                                                 layer_types=["sliding_attention", "full_attention"],
                                                 max_position_embeddings=P, **common),
        "tiny-random-phi3": T.Phi3Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=P,
                                         original_max_position_embeddings=P, **common),
        "tiny-random-olmo2": T.Olmo2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2, intermediate_size=64, max_position_embeddings=P,
                                           **common),
        # rotary of another convention (GPT-J: interleaved pairs, apply(x, sin, cos)), partial rotary (GPT-J's
        # rotary_dim, StableLM's and Phi's partial_rotary_factor), Falcon's fused multi-query and grouped layouts
        "tiny-random-gptj": T.GPTJConfig(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=P, **common),
        "tiny-random-stablelm": T.StableLmConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 num_key_value_heads=2, intermediate_size=64,
                                                 partial_rotary_factor=0.25, max_position_embeddings=P, **common),
        "tiny-random-phi": T.PhiConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                       partial_rotary_factor=0.5, max_position_embeddings=P, **common),
        # ALiBi and NeoX-ordered fused rows
        "tiny-random-bloom": T.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **common),
        "tiny-random-falcon": T.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             multi_query=True, max_position_embeddings=P, **common),
        "tiny-random-falcon-gqa": T.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 num_kv_heads=2, new_decoder_architecture=True,
                                                 max_position_embeddings=P, **common),
    }


def build_tiny(name: str, seed: int = 0) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    cfg = tiny_configs()[name]
    layout = layout_for_config(cfg)  # (a family's layout can depend on its config: Falcon's fused rows)
    cfg._attn_implementation = layout.attn_implementation
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.eval()
    lm = LoadedModel(name, model, byte_tokenizer(), layout, f"built in code (seed {seed})")
    check_layout(lm)
    return lm
