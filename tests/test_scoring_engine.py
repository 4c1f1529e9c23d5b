"""The scoring engine against the model's own forward pass, on every tiny family: the prefix buffers reused across
batches (PrefixCache) and one unembedding product per batch give what a plain forward of each whole prompt gives."""

import dataclasses
import os

import numpy as np
import pytest
import torch

from iclgd.core.models.tiny import build_tiny, tiny_configs
from iclgd.core.tasks import TaskSpec
from iclgd.engine import scoring as S
from iclgd.engine.capture import Observer

# two-word and one-word label words: multi-token options under the byte tokenizer, one row per option
SPEC = TaskSpec(name="toy", template="Review: {text}\nSentiment:", label_words=("bad", "good", "so so"),
                fields={"text": "text"}, demo_file="-", eval_file="-")
ROWS = [{"text": t, "label": i % 3} for i, t in enumerate(["a fine film", "dull", "so so, really", "great fun!",
                                                            "no", "a long and winding story about nothing"])]


def _reference(lm, p: S.Prompts) -> np.ndarray:
    """Mean log-probability of each option's tokens, from the model's own logits of the whole prompt + option."""
    out = np.zeros((len(p.query_ids), len(p.option_ids)))
    for i, q in enumerate(p.query_ids):
        for c, o in enumerate(p.option_ids):
            ids = torch.tensor([p.prefix_ids + q + o])
            with torch.no_grad():
                logits = lm.model(input_ids=ids).logits[0].double()
            start = len(p.prefix_ids) + len(q) - 1
            lp = torch.log_softmax(logits[start: start + len(o)], -1)
            out[i, c] = lp[torch.arange(len(o)), torch.tensor(o)].mean().item()
    return out


@pytest.mark.parametrize("single", [False, True], ids=["multi-token", "one-token"])
@pytest.mark.parametrize("name", sorted(tiny_configs()))
def test_batched_scoring_equals_the_models_own_logits(name, single, monkeypatch):
    lm = build_tiny(name)
    # in float64 the only differences left are the engine's, not fp32 rounding. Not for tiny Gemma-2: its 8-token
    # sliding window lets a right-padded row's window hold padding only, and transformers' eager softmax (in fp32) turns
    # the fp64 mask minimum into -inf, so that row is NaN and 0·NaN spreads it (fp32 masks stay finite); nor for
    # XGLM, which cannot run in float64 at all (layout.DTYPE_LIMITS)
    fp64 = name not in ("tiny-random-gemma2", "tiny-random-xglm")
    if fp64:
        lm.model.double()
    p = S.build_prompts(lm, SPEC, ROWS[:2], ROWS)
    assert any(len(o) > 1 for o in p.option_ids)
    if single:  # one-token options (the byte tokenizer gives none): one row per example, its last position shared
        p = dataclasses.replace(p, option_ids=[[o[1]] for o in p.option_ids])
    ref = _reference(lm, p)
    got = S.score_options(lm, p, batch_size=4)
    np.testing.assert_allclose(got, ref, atol=1e-9 if fp64 else 2e-5, rtol=0)
    # the per-batch concatenation the prefix buffers replaced: the same numbers, bit for bit (captures too)
    monkeypatch.setattr(S, "REUSE_BUFFERS", False)
    demo_pos = [i for a, b in p.demo_spans for i in range(a, b)]
    runs = []
    for reuse in (False, True):
        monkeypatch.setattr(S, "REUSE_BUFFERS", reuse)
        obs = Observer(lm, demo_pos, keep_kv=3, keep_prefix_kv=True)
        runs.append((S.score_options(lm, p, batch_size=4, observer=obs), obs))
    (a, oa), (b, ob) = runs
    assert np.array_equal(a, b)
    for j in range(len(ROWS)):
        assert np.array_equal(oa.obs[j].h, ob.obs[j].h) and np.array_equal(oa.obs[j].s_after, ob.obs[j].s_after)


def test_final_logit_soft_cap_is_applied_to_the_option_scores():
    """Gemma-2 caps its logits (cap·tanh(z / cap)) before the softmax: the option scores are those of the capped
    logits (a cap small enough to matter here)."""
    lm = build_tiny("tiny-random-gemma2")
    lm.model.double()
    p = S.build_prompts(lm, SPEC, [], ROWS)
    plain = S.score_options(lm, p, batch_size=1)  # one row at a time: no padding (see above)
    lm.model.config.final_logit_softcapping = 0.05
    capped = S.score_options(lm, p, batch_size=1)
    assert not np.allclose(plain, capped)
    np.testing.assert_allclose(capped, _reference(lm, p), atol=1e-9, rtol=0)


def test_the_prefix_buffers_are_freed_when_the_pass_ends_without_the_cyclic_collector():
    """A reference cycle through the cache would keep its buffers (hundreds of MB for a 32-shot prompt) alive until
    Python's cyclic collector happened to run: with that collector off, they must go when the cache goes."""
    import gc
    import weakref

    lm = build_tiny("tiny-random-llama")
    p = S.build_prompts(lm, SPEC, ROWS[:2], ROWS)
    gc.collect()
    gc.disable()
    try:
        cache = S.prefix_cache(S.encode_prefix(lm, p.prefix_ids), rows=4, t_max=len(p.query_ids[0]))
        with torch.no_grad():
            lm.model.base_model(input_ids=torch.tensor([p.query_ids[0]] * 2),
                                attention_mask=torch.ones(2, len(p.prefix_ids) + len(p.query_ids[0]), dtype=torch.long),
                                cache=cache.start(2), use_cache=True)
        buf = weakref.ref(cache.layers[0].kb.buf)
        del cache
        assert buf() is None
    finally:
        gc.enable()


GQA_FAMILIES = sorted(n for n, c in tiny_configs().items()
                      if 0 < getattr(c, "num_key_value_heads", 0) < getattr(c, "num_attention_heads", 0))


@pytest.mark.parametrize("name", GQA_FAMILIES)
def test_grouped_kv_heads_reach_the_cpu_kernel_as_they_are_and_give_the_same_floats(name, monkeypatch):
    """A padded batch after a cached prefix carries a mask, under which transformers copies every KV head to each
    query head it serves before attention (repeat_kv); iclgd's scoring hands torch's CPU kernel the grouped heads
    instead (core/models/attention.native_gqa). The kernel must see the grouped heads, and the option scores and
    captures must be the same floats as with the copies."""
    from iclgd.core.models import attention as A

    lm = build_tiny(name)
    p = S.build_prompts(lm, SPEC, ROWS[:2], ROWS)
    demo_pos = [i for a, b in p.demo_spans for i in range(a, b)]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    seen = []

    def spy(q, k, v, *args, **kwargs):  # query heads, key heads, enable_gqa, masked: of every call under a mask
        if kwargs.get("attn_mask") is not None:
            seen.append((q.shape[1], k.shape[1], kwargs.get("enable_gqa", False)))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    runs = {}
    for force in (None, "0"):  # iclgd's choice; the environment keeping transformers' own (repeat_kv under a mask)
        if force is None:
            monkeypatch.delenv(A.FORCE_GQA, raising=False)
        else:
            monkeypatch.setenv(A.FORCE_GQA, force)
        seen.clear()
        obs = Observer(lm, demo_pos, keep_kv=3, keep_prefix_kv=True)
        runs[force] = (S.score_options(lm, p, batch_size=4, observer=obs), obs, list(seen))
        assert os.environ.get(A.FORCE_GQA) == force  # put back as it was after the pass
    (a, oa, seen_a), (b, ob, seen_b) = runs[None], runs["0"]
    if not seen_a:
        pytest.skip(f"{name}: its attention does not go through torch's SDPA under a mask")
    n_kv = lm.model.config.num_key_value_heads
    assert all(hk == n_kv and gqa for _, hk, gqa in seen_a), seen_a[:3]  # grouped heads, as they are
    assert all(hk == hq and not gqa for hq, hk, gqa in seen_b), seen_b[:3]  # the copies, as transformers makes them
    assert np.array_equal(a, b)
    for j in range(len(ROWS)):
        assert np.array_equal(oa.obs[j].h, ob.obs[j].h) and np.array_equal(oa.obs[j].s_after, ob.obs[j].s_after)
