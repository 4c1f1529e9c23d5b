"""Induction-head scores (iclgd.engine.induction): a GPT-2 whose layer-1 head 0 is an induction head by construction,
the attention probabilities against the models' own, the copying score against the full vocabulary × vocabulary
eigenproblem, and sane scores on every tiny family."""

import numpy as np
import pytest
import torch
import transformers as T

from iclgd.core.hooks import Recorder
from iclgd.core.models import build_tiny, byte_tokenizer, from_objects, qkv, repeat_kv, tiny_configs
from iclgd.engine.induction import attention_probs, copying_scores, induction_scores, repeated_sequences

# ----------------------------------------------------------------------------- a hand-built induction head

V, D, H, HD, P = 259, 384, 6, 64, 64  # vocabulary, d_model, heads, d_head, positions


def codes(seed: int = 0):
    """The subspaces ``tok``, ``pos``, ``prev`` (D, 64) each and the token codes u (V, 64) of :func:`hand_built`."""
    basis = torch.zeros(D, 3 * HD)  # (D, 192) orthonormal columns of mean zero
    i = torch.arange(3 * HD)
    basis[2 * i, i], basis[2 * i + 1, i] = 0.5 ** 0.5, -(0.5 ** 0.5)
    tok, pos, prev = basis[:, :HD], basis[:, HD:2 * HD], basis[:, 2 * HD:]  # disjoint supports
    u = torch.randn(V, HD, generator=torch.Generator().manual_seed(seed))
    return tok, pos, prev, u / u.norm(dim=1, keepdim=True)  # unit token codes


def hand_built(k_composition: bool = True, ov_sign: float = 1.0, seed: int = 0):
    """A 2-layer GPT-2 (MLPs zero, learned positions) through iclgd's loader, whose layer-0 head 0 is a
    previous-token head and layer-1 head 0 an induction head; every other head is zero (uniform attention, no
    output).

    Every vector lives in three orthonormal 64-dim subspaces of disjoint supports, each spanned by vectors
    (e_{2i} − e_{2i+1})/√2: every vector has mean zero, so LayerNorm (weight 1, bias 0) only rescales it, to norm
    √d; and a head writing in one subspace adds exactly nothing to what reads another. ``tok`` holds the token
    code u_t (random unit vectors), ``pos`` a one-hot position, ``prev`` what layer 0 writes.

    Layer 0 head 0: query row r reads position r, key row r reads position r − 1 (so query p matches key p − 1),
    value reads ``tok``, output writes it into ``prev`` at unit norm. Layer 1 head 0 (K-composition): the query
    reads the current token from ``tok``, the key the previous token from ``prev``; its OV is ``ov_sign`` × the
    projection on ``tok`` (+1: copying). ``k_composition=False`` zeroes layer 0's output, so layer 1's keys have
    nothing to read.
    """
    cfg = T.GPT2Config(vocab_size=V, n_positions=P, n_embd=D, n_layer=2, n_head=H, bos_token_id=256,
                       eos_token_id=257, pad_token_id=258)
    model = T.GPT2LMHeadModel(cfg)
    tok, pos, prev, u = codes(seed)
    eps = cfg.layer_norm_epsilon
    c0 = (2 / D + eps) ** -0.5  # LayerNorm's gain on layer 0's inputs, token + position (norm √2)
    Wq, Wk, Wv = (torch.zeros(2, H * HD, D) for _ in range(3))  # (layer, H·hd, d) nn.Linear convention
    Wo = torch.zeros(2, D, H * HD)  # (layer, d, H·hd)
    # layer 0, head 0: previous token
    Wq[0, :HD] = 2.0 * pos.T  # q_p = 2·c0·e_p
    Wk[0, 1:HD] = pos[:, :HD - 1].T  # k_j = c0·e_{j+1}: scores 2·c0²/8 ≈ 48 at j = p − 1, else 0
    Wv[0, :HD] = tok.T  # v_j = c0·u_{t_j}
    Wo[0, :, :HD] = prev / c0 if k_composition else 0.0  # writes u_{t_{p−1}} into prev, unit norm
    # layer 1, head 0: induction (inputs of norm √3: token + position + previous token)
    Wq[1, :HD] = 4.0 * tok.T  # q_p ∝ u_{t_p}
    Wk[1, :HD] = prev.T  # k_j ∝ u_{t_{j−1}}: scores ≈ 64·⟨u_{t_p}, u_{t_{j−1}}⟩
    Wv[1, :HD] = tok.T
    Wo[1, :, :HD] = ov_sign * tok  # OV = ±(projection on tok)
    with torch.no_grad():
        tr = model.transformer
        tr.wte.weight.copy_(u @ tok.T)  # (V, d)
        tr.wpe.weight.copy_(pos.T)  # (P, d)
        for l, blk in enumerate(tr.h):
            blk.attn.c_attn.weight.copy_(torch.cat([Wq[l], Wk[l], Wv[l]]).T)  # Conv1D (in, out): [q | k | v]
            blk.attn.c_proj.weight.copy_(Wo[l].T)
            for p in (blk.attn.c_attn.bias, blk.attn.c_proj.bias, blk.mlp.c_fc.weight, blk.mlp.c_fc.bias,
                      blk.mlp.c_proj.weight, blk.mlp.c_proj.bias, blk.ln_1.bias, blk.ln_2.bias):
                p.zero_()
            blk.ln_1.weight.fill_(1.0)
            blk.ln_2.weight.fill_(1.0)
    assert model.lm_head.weight.data_ptr() == tr.wte.weight.data_ptr()  # tied: W_U = W_Eᵀ
    return from_objects(model, byte_tokenizer(), name="hand-built induction")


@pytest.fixture(scope="module")
def built():
    return hand_built()


def test_the_construction_is_what_it_claims(built):
    """Numerically, before any score: iclgd reads the weights as written, layer 0 head 0 attends to the previous
    token, and layer 1's residual stream holds the previous token's code at unit norm."""
    lm = built
    p0 = lm.projections(0)
    assert p0.Wq.shape == (H * HD, D) and p0.Wo.shape == (D, H * HD)
    ids, _ = repeated_sequences(lm, 2, 20, seed=5)
    with Recorder(lm, points=("attn_in", "block_in")) as rec:
        lm.model(input_ids=ids)
    T_ = ids.shape[1]
    probs = attention_probs(lm, 0, rec.acts["attn_in.0"], torch.arange(T_))  # (B, H, T, T)
    prev_tok = probs[:, 0, torch.arange(1, T_), torch.arange(T_ - 1)]  # (B, T − 1)
    assert prev_tok.min() > 0.999
    r1 = rec.acts["block_in.1"]  # (B, T, d) the residual stream after layer 0
    assert torch.allclose(r1.norm(dim=-1), torch.full((2, T_), 3 ** 0.5), atol=1e-3)
    # what layer 0 wrote at position p ≥ 1 is exactly the previous token's code, in the prev subspace
    tok, pos, prev, u = codes()
    E = lm.model.get_input_embeddings().weight  # (V, d)
    written = r1[:, 1:] - E[ids[:, 1:]] - pos.T[1:T_]  # (B, T − 1, d)
    assert (written - u[ids[:, :-1]] @ prev.T).abs().max() < 1e-3
    # layer 1 head 0: its key at j reads that code, its query the current token's; scores peak on the target
    x1 = rec.acts["attn_in.1"][0]  # (T, d)
    q, k, _, _ = qkv(lm, 1, x1, torch.arange(T_))  # (H, T, hd)
    c1 = (3 / D + 1e-5) ** -0.5
    assert torch.allclose(q[0, 1:], 4.0 * c1 * u[ids[0, 1:]], atol=1e-3)
    assert torch.allclose(k[0, 1:], c1 * u[ids[0, :-1]], atol=1e-3)


def test_hand_built_induction_head_scores(built):
    r = induction_scores(built, n_seq=8, seq_len=20, seed=1)
    pm, cp, cl = r["prefix_matching"], r["copying"], r["copying_logit"]
    assert pm.shape == cp.shape == cl.shape == (2, H)
    assert pm[1, 0] > 0.99
    others = np.ones((2, H), dtype=bool)
    others[1, 0] = False
    assert pm[others].max() < 0.2  # uniform heads get 1/(position + 1), the previous-token head ≈ 0
    assert pm[0, 0] < 0.01
    assert cp[1, 0] > 0.99  # OV = projection on the token subspace, W_U = W_Eᵀ: W_E^T P W_E is PSD
    assert np.all(np.abs(cp[others]) < 1e-6)  # zero OV, or (0, 0): writes outside what W_U reads
    assert cl[1, 0] > 0.99 and cl[others].max() == 0.0
    assert r["top_heads"][0][:2] == (1, 0) and len(r["top_heads"]) == 5
    assert [t[2] for t in r["top_heads"]] == sorted((t[2] for t in r["top_heads"]), reverse=True)
    assert (r["n_seq"], r["seq_len"], r["seed"], r["bos"]) == (8, 20, 1, True)


def test_without_k_composition_or_with_a_negated_ov_the_scores_say_so():
    """The same model with layer 0's output removed has no induction head (its keys have nothing to match); with
    the layer-1 OV negated it still prefix-matches but anti-copies (copying −1, target never top-1)."""
    no_k = induction_scores(hand_built(k_composition=False), n_seq=4, seq_len=20, seed=1)
    assert no_k["prefix_matching"].max() < 0.2
    anti = induction_scores(hand_built(ov_sign=-1.0), n_seq=4, seq_len=20, seed=1)
    assert anti["prefix_matching"][1, 0] > 0.99
    assert anti["copying"][1, 0] < -0.99
    assert anti["copying_logit"][1, 0] == 0.0


def test_repeated_sequences_structure_and_seed(built):
    ids, o = repeated_sequences(built, 5, 30, seed=3)
    assert o == 1 and ids.shape == (5, 61)
    assert (ids[:, 0] == built.bos_id).all()
    assert torch.equal(ids[:, 1:31], ids[:, 31:])
    assert all(len(set(row[1:31].tolist())) == 30 for row in ids)
    assert ids[:, 1:].max() < 256  # the byte tokenizer's specials are 256..258
    assert torch.equal(ids, repeated_sequences(built, 5, 30, seed=3)[0])
    assert not torch.equal(ids, repeated_sequences(built, 5, 30, seed=4)[0])


# ----------------------------------------------------------------------------- against the models' own attention


def _eager(name: str):
    """A tiny model on eager attention, its separate query projections ×10: random tiny heads score |q·k| ≪ 1, where
    a missing soft-cap (5 for Gemma-2) or a misplaced scale would hide below 1e-5."""
    lm = build_tiny(name)
    if lm.model.config._attn_implementation != "eager":
        lm.model.set_attn_implementation("eager")
    if lm.layout.q is not None:
        with torch.no_grad():
            for l in range(lm.n_layers):
                getattr(lm.attention(l), lm.layout.q).weight.mul_(10.0)
    return lm


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-bloom", "tiny-random-mistral",
                                  "tiny-random-gemma2", "tiny-random-gpt-neo", "tiny-random-falcon-gqa"])
def test_attention_probs_equal_the_models_output_attentions(name):
    """Grouped KV + rotary (Llama, Falcon's fused grouped rows), ALiBi (BLOOM), a sliding window of 8 crossed by
    25 tokens (Mistral; Gemma-2 with soft-capping and its own scale), GPT-Neo's unscaled scores: eager attention's
    own probabilities, to 1e-5."""
    lm = _eager(name)
    ids, _ = repeated_sequences(lm, 2, 12, seed=0)  # (2, 25)
    with Recorder(lm, points=("attn_in",)) as rec:
        out = lm.model(input_ids=ids, output_attentions=True, use_cache=False)
    assert len(out.attentions) == lm.n_layers
    for l in range(lm.n_layers):
        mine = attention_probs(lm, l, rec.acts[f"attn_in.{l}"], torch.arange(ids.shape[1]))
        theirs = out.attentions[l]
        assert mine.shape == theirs.shape
        assert (mine - theirs).abs().max().item() < 1e-5, (name, l)
    crossed = [l for l in lm.windowed_layers() if lm.window(l) < ids.shape[1]]
    assert bool(crossed) == (name in ("tiny-random-mistral", "tiny-random-gemma2"))
    for l in crossed:  # keys W or more back get exactly 0, in the model and here
        assert out.attentions[l][:, :, -1, : ids.shape[1] - lm.window(l)].abs().max() == 0


def _full_copying(lm, l: int, h: int) -> float:
    """Σλ/Σ|λ| of the full V × V matrix W_U W_O^h W_V^h W_E, from the modules' own weights (no Projections)."""
    attn = lm.attention(l)
    Hq, Hkv, hd = lm.head_counts()
    Wv = attn.v_proj.weight.double()[(h // (Hq // Hkv)) * hd:(h // (Hq // Hkv) + 1) * hd]  # (hd, d)
    Wo = attn.o_proj.weight.double()[:, h * hd:(h + 1) * hd]  # (d, hd)
    E = lm.model.get_input_embeddings().weight.double()  # (V, d)
    U = lm.model.get_output_embeddings().weight.double()  # (V, d)
    lam = torch.linalg.eigvals(U @ Wo @ Wv @ E.T)  # (V,)
    return (lam.sum().real / lam.abs().sum()).item()


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gemma3"])
def test_copying_equals_the_full_vocabulary_eigenproblem(name):
    """The d_head × d_head shortcut (cyclic property) and the grouped-KV indexing against the 259 × 259 matrix."""
    lm = build_tiny(name)
    cp = copying_scores(lm)
    Hq = lm.head_counts()[0]
    full = np.array([[_full_copying(lm, l, h) for h in range(Hq)] for l in range(lm.n_layers)])
    assert np.abs(cp - full).max() < 1e-6
    assert np.ptp(cp) > 0.01  # random heads differ: the check could tell them apart


# ----------------------------------------------------------------------------- every family


@pytest.mark.parametrize("name", sorted(tiny_configs()))
def test_scores_on_every_tiny_family(name):
    lm = build_tiny(name)
    r = induction_scores(lm, n_seq=3, seq_len=6, seed=0, batch_size=2)
    Hq = lm.head_counts()[0]
    for key in ("prefix_matching", "copying", "copying_logit"):
        assert r[key].shape == (lm.n_layers, Hq), key
        assert np.isfinite(r[key]).all(), key
    assert ((r["prefix_matching"] >= 0) & (r["prefix_matching"] <= 1)).all()
    assert ((r["copying"] >= -1 - 1e-9) & (r["copying"] <= 1 + 1e-9)).all()
    assert ((r["copying_logit"] >= 0) & (r["copying_logit"] <= 1)).all()
    assert r["prefix_matching"].max() > 0  # a random head puts some weight on the target
    # the probabilities are the model's: with the values they give every head's own output
    ids, _ = repeated_sequences(lm, 2, 6, seed=0)
    with Recorder(lm, points=("attn_in", "attn_heads")) as rec:
        lm.model(input_ids=ids, use_cache=False)
    pos = torch.arange(ids.shape[1])
    for l in range(lm.n_layers):
        x = rec.acts[f"attn_in.{l}"]  # (B, T, d)
        probs = attention_probs(lm, l, x, pos)  # (B, H, T, T)
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
        B, T_, d = x.shape
        _, _, v, _ = qkv(lm, l, x.reshape(B * T_, d), pos.repeat(B))  # (H_kv, B·T, hd)
        v = repeat_kv(v.reshape(v.shape[0], B, T_, -1), Hq // v.shape[0], dim=0)  # (H, B, T, hd)
        mine = torch.einsum("bhqk,hbkd->bqhd", probs, v.float()).reshape(B, T_, -1)  # (B, T, H·hd)
        true = rec.acts[f"attn_heads.{l}"].float()
        assert ((mine - true).norm() / true.norm()).item() < 1e-4, (name, l)


def _top1_by_full_logits(lm, layer, z, target, allowed, P_out):
    """The definition itself: each head's full vocabulary logits W_U P_out W_O^h z_h, then whether the target beats
    every other allowed token strictly."""
    p = lm.projections(layer)
    U = lm.model.get_output_embeddings().weight.double()  # (V, d_e)
    N, H, hd = z.shape
    Wo = p.Wo.detach().double().reshape(-1, H, hd)  # (d_model, H, hd)
    out = torch.zeros(H, N, dtype=torch.bool)
    for h in range(H):
        c = z[:, h].double() @ Wo[:, h].T  # (N, d_model)
        if P_out is not None:
            c = c @ P_out.double().T
        logits = c @ U.T  # (N, V)
        for n in range(N):
            rivals = allowed.clone()
            rivals[target[n]] = False
            out[h, n] = bool((logits[n, rivals] < logits[n, target[n]]).all())
    return out


@pytest.mark.parametrize("screen", [0, 16, 2048])
@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gemma3", "tiny-random-opt-projected"])
def test_direct_logit_top1_equals_the_full_vocabulary_definition(name, screen):
    """With and without the screen (16 of 259 tokens; 2048 = none, more than the vocabulary) against full logits
    per head and query: a head that is the target's own embedding
    direction mostly wins, a zero head and a tie with a duplicated unembedding row lose, disallowed tokens are ignored."""
    from iclgd.engine.induction import _embedding_maps, direct_logits_top1

    if name == "tiny-random-opt-projected":  # OPT with project_in/out (embeddings narrower than the stream)
        cfg = T.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, vocab_size=259,
                          max_position_embeddings=64, word_embed_proj_dim=16, bos_token_id=256, eos_token_id=257,
                          pad_token_id=258)
        torch.manual_seed(0)
        lm = from_objects(T.OPTForCausalLM(cfg), byte_tokenizer(), name=name)
    else:
        lm = build_tiny(name)
    P_out = _embedding_maps(lm)[2]
    assert (P_out is not None) == (name == "tiny-random-opt-projected")
    H, _, hd = lm.head_counts()
    V = lm.model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(3)
    N = 40
    z = torch.randn(N, H, hd, generator=g)
    z[:, 1] = 0.0  # a silent head ranks nothing first
    target = torch.randint(0, 256, (N,), generator=g)
    allowed = torch.ones(V, dtype=torch.bool)
    allowed[torch.randint(0, V, (30,), generator=g)] = False
    allowed[target] = True
    allowed[7] = True  # the tie below needs its rival
    with torch.no_grad():
        U = lm.model.get_output_embeddings().weight
        U[5] = U[7]  # rows 5 and 7 tie whatever the head writes
    target[:4] = 5
    Wo = lm.projections(0).Wo.detach().reshape(-1, H, hd)[:, 0]  # (d_model, hd) head 0's block
    M = (U @ P_out @ Wo) if P_out is not None else U @ Wo  # (V, hd) head 0's map from its output to the logits
    z[:, 0] = M[target].detach()  # head 0 writes (mostly) its target's direction
    got = direct_logits_top1(lm, 0, z, target, allowed, P_out, screen=screen)
    ref = _top1_by_full_logits(lm, 0, z, target, allowed, P_out)
    assert torch.equal(got, ref)
    assert not got[1].any() and not got[:, :4].any()
    assert got[0, 4:].float().mean() > 0.2 and got[2:].float().mean() < 0.1  # the check can tell heads apart
