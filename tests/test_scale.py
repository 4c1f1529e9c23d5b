"""Issue 17: placement under several processes, provenance of the hardware, batched captures."""

import json
import logging
import math

import numpy as np
import pytest

from iclgd.core.models import hardware, placement, run_versions


def test_each_launched_process_takes_its_own_gpu(monkeypatch):
    for var in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert placement("cuda", None) == ("cuda", None)  # one process: as given
    assert placement("cuda", "auto") == ("cuda", "auto")  # one process may spread a large model over every GPU
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert placement("cuda", None) == ("cuda:1", None)
    assert placement("cuda", "auto") == ("cuda:1", {"": "cuda:1"})  # not every rank on GPU 0
    assert placement("cpu", None) == ("cpu", None)
    assert placement("cuda:0", None) == ("cuda:0", None)  # an explicit device wins


def test_results_record_the_hardware_and_determinism_flags():
    import torch

    hw = hardware()
    assert hw["cpu_threads"] == torch.get_num_threads() and hw["cuda_available"] == torch.cuda.is_available()
    assert hw["deterministic_algorithms"] == torch.are_deterministic_algorithms_enabled()
    assert run_versions()["hardware"] == json.loads(json.dumps(hw))


# ----------------------------------------------------------------------------- batched captures


class _PerExampleObserver:
    """The captures as iclgd computed them before issue 17 (one example and one layer at a time, float64 on the
    host, everything kept): the reference the batched :class:`iclgd.engine.capture.Observer` must equal."""

    def __init__(self, lm, demo_positions=(), position="last", keep_q=0, keep_demo=0, keep_kv=0, keep_prefix_kv=False):
        self.lm, self.demo_positions, self.position, self.obs = lm, list(demo_positions), position, {}

    def set_prefix(self, rec, P, prefix_kv=None):  # derives every key and value again, whatever the cache holds
        import torch

        from iclgd.core.models import qkv

        with torch.no_grad():
            kv = [qkv(self.lm, l, rec.acts[f"attn_in.{l}"][0], torch.arange(P))[1:3] for l in range(self.lm.n_layers)]
        self._k_prefix = [k for k, _ in kv]
        self.prefix_kv = [(k.double().numpy(), v.double().numpy()) for k, v in kv]

    def take_batch(self, rec, items, P, cache=None):
        for i, r, pos, nq in items:
            self.take(rec, i, r, pos, nq, P)

    def take(self, rec, example, row, pos, n_query, P):
        import numpy as np
        import torch

        from iclgd.core.models import qkv, repeat_kv
        from iclgd.engine.capture import Observation

        hs, sa, qs, ds, ks, vs = [], [], [], [], [], []
        positions = P + torch.arange(pos + 1)
        dpos = torch.tensor(self.demo_positions, dtype=torch.long)
        for l in range(self.lm.n_layers):
            x = rec.acts[f"attn_in.{l}"][row, : pos + 1]
            q, k, v, scale = qkv(self.lm, l, x, positions)
            H, Hkv = q.shape[0], k.shape[0]
            ks.append(k[:, : pos + 1].double().numpy())
            vs.append(v[:, : pos + 1].double().numpy())
            q_pred = q[:, pos]
            k_after = repeat_kv(k[:, : pos + 1], H // Hkv, dim=0)
            cap = self.lm.softcap(l)
            capped = (lambda s: cap * torch.tanh(s / cap)) if cap else (lambda s: s)
            sa.append(capped(torch.einsum("hd,htd->ht", q_pred, k_after) * scale).double().numpy())
            qs.append(q_pred.double().numpy())
            hs.append(rec.acts[f"attn_out.{l}"][row, pos].double().numpy())
            if len(dpos):
                kp = repeat_kv(self._k_prefix[l][:, dpos], H // Hkv, dim=0)
                sd = capped(torch.einsum("hd,htd->ht", q_pred, kp) * scale).sum(0).double().numpy()
                W = self.lm.window(l)
                if W is not None:
                    sd[dpos.numpy() <= P + pos - W] = -np.inf
                ds.append(sd)
        self.obs[example] = Observation(np.stack(hs), np.stack(sa), n_query, np.stack(qs),
                                        np.stack(ds) if ds else None, float(scale), (np.stack(ks), np.stack(vs)))


def _floats(a, b, path=""):
    """Every number of two result trees, pairwise (the rest must be equal)."""
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), path
        for k in a:
            yield from _floats(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _floats(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and not isinstance(a, bool):
        yield path, a, b
    else:
        assert a == b, path


@pytest.mark.parametrize("name,position", [("tiny-random-llama", "last"), ("tiny-random-gpt2", "label-token"),
                                           ("tiny-random-gemma2", "last"), ("tiny-random-mistral", "last")])
def test_batched_captures_give_the_per_example_results_to_1e6(name, position, data_dir, monkeypatch):
    """A whole compare (every metric, its baselines, Kendall by one product per layer, the ΔW comparison) from the
    batched, pruned captures equals the one from the per-example captures to 1e-6. In float64: in float32 the
    tiny random models' FT moves some layers' scores by less than float32 rounding, so SimAM_Δ there is rounding
    noise under either implementation (a real model's FT moves them by far more)."""
    import math

    from iclgd.core.models import load_model
    from iclgd.core.tasks import TASKS, load_task
    from iclgd.experiments import compare

    lm = load_model(name, dtype="float64")
    data = load_task(TASKS["sst2"], data_dir, n_test=6)
    cfg = compare.CompareConfig(k=3, position=position, batch_size=4, kendall_n=4, updates_n=3)
    new = compare.compare_seed(lm, data, cfg, 1, progress=False)[0]
    monkeypatch.setattr(compare, "Observer", _PerExampleObserver)
    old = compare.compare_seed(lm, data, cfg, 1, progress=False)[0]
    pairs = list(_floats(new, old))
    assert len(pairs) > 100
    for path, x, y in pairs:
        assert (math.isnan(x) and math.isnan(y)) or abs(x - y) <= 1e-6 * max(1.0, abs(y)), (path, x, y)


def test_kendall_logits_by_one_product_per_layer_equal_the_per_example_einsum():
    import numpy as np

    from iclgd.core import metrics as M

    rng = np.random.default_rng(0)
    q_test, q_train = rng.normal(size=(5, 3, 2, 4)), rng.normal(size=(3, 7, 2, 4))  # (n, L, H, d), (L, T, H, d)
    for paper in (True, False):
        got = M.ft_query_logits(q_test, q_train, 0.5, paper)
        want = np.stack([M.ft_query_logits(q, q_train, 0.5, paper) for q in q_test])
        np.testing.assert_allclose(got, want, rtol=1e-12)
    # and by hand: layer 1, example 2, training token 3 = Σ_h Σ_d q_test·q_train
    assert M.query_logits(q_test, q_train)[2, 1, 3] == pytest.approx(float((q_test[2, 1] * q_train[1, 3]).sum()))


def test_batch_size_auto_and_halving_on_gpu_out_of_memory(tiny, data_dir, monkeypatch, caplog):
    import numpy as np
    import torch

    from iclgd.core.errors import IclgdError
    from iclgd.core.tasks import TASKS, load_task, sample_demos
    from iclgd.engine import scoring

    lm = tiny("tiny-random-llama")
    assert scoring.resolve_batch_size(lm, "auto") == scoring.AUTO_CPU_BATCH and scoring.resolve_batch_size(lm, 3) == 3
    with pytest.raises(IclgdError, match="--batch-size 0"):
        scoring.resolve_batch_size(lm, 0)
    data = load_task(TASKS["sst2"], data_dir, n_test=7)
    p = scoring.build_prompts(lm, TASKS["sst2"], sample_demos(data.demo_pool, 2, 1), data.eval_rows)
    want = scoring.score_options(lm, p, batch_size=2)
    real, sizes = scoring._score_batch, []

    def small_gpu(lm, prompts, batch, *args):  # as a GPU that holds at most 2 examples per batch
        sizes.append(len(batch))
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(lm, prompts, batch, *args)

    monkeypatch.setattr(scoring, "_score_batch", small_gpu)
    monkeypatch.setattr(lm, "batch_limit", None)  # the cached model is shared: restored after the test
    with caplog.at_level(logging.WARNING, logger="iclgd.engine.scoring"):
        got = scoring.score_options(lm, p, batch_size=8)
    assert "batch size now 4" in caplog.text and "batch size now 2" in caplog.text  # shown, not filtered
    assert sizes[:3] == [7, 4, 2] and set(sizes[3:]) <= {2, 1}  # halved until it fits, then kept
    # the size that fitted is what later passes use and what results record as applied
    assert lm.batch_limit == 2 and scoring.resolve_batch_size(lm, "auto") == 2 and scoring.resolve_batch_size(lm, 8) == 2
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert not np.isnan(got).any()  # no example skipped by a failed batch


def test_zsl_pass_reused_across_seeds_gives_the_same_results(tiny, data_dir):
    from iclgd.core.tasks import TASKS, load_task
    from iclgd.experiments.compare import CompareConfig, ZslCache, compare_seed

    lm = tiny("tiny-random-llama")
    data = load_task(TASKS["sst2"], data_dir, n_test=5)
    cfg = CompareConfig(k=2)
    cache = ZslCache()
    r1, _, ph1 = compare_seed(lm, data, cfg, 1, False, cache)
    r2, rec2, ph2 = compare_seed(lm, data, cfg, 2, False, cache)
    fresh, rec_fresh, ph_fresh = compare_seed(lm, data, cfg, 2, False)
    assert (ph1["zsl_reused"], ph2["zsl_reused"], ph_fresh["zsl_reused"]) == (False, True, False)
    assert json.dumps(r2, sort_keys=True) == json.dumps(fresh, sort_keys=True) and rec2 == rec_fresh
    other = load_task(TASKS["sst2"], data_dir, n_test=4)  # another test set is never served from the cache
    assert compare_seed(lm, other, cfg, 1, False, cache)[2]["zsl_reused"] is False


def test_metrics_in_chunks_equal_the_metrics_on_all_examples(tiny, data_dir, monkeypatch):
    from iclgd.core.tasks import TASKS, load_task
    from iclgd.experiments import compare

    lm = tiny("tiny-random-llama")
    data = load_task(TASKS["sst2"], data_dir, n_test=7)
    cfg = compare.CompareConfig(k=2)
    whole = compare.compare_seed(lm, data, cfg, 3, False)[0]
    monkeypatch.setattr(compare, "METRICS_CHUNK", 2)  # 4 chunks, the last one short
    chunked = compare.compare_seed(lm, data, cfg, 3, False)[0]
    pairs = [p for key in ("simaou", "simam", "kendall") for p in _floats(chunked[key], whole[key])]
    assert len(pairs) >= 39  # running sums: equal up to the order of the additions
    for path, x, y in pairs:
        assert (x != x and y != y) or abs(x - y) <= 1e-12 * max(1.0, abs(y)), (path, x, y)
    assert chunked["ft_changed"] == whole["ft_changed"]
    assert whole["simaou"]["baseline_gaussian"]["overall"] != whole["simaou"]["baseline_uniform"]["overall"]


def test_capture_store_gives_back_what_was_put_and_holds_no_large_array_in_memory():
    import numpy as np

    from iclgd.engine.capture import CaptureStore, Observation

    rng = np.random.default_rng(0)
    store, put = CaptureStore(), {}
    for i, T in [(3, 5), (0, 2), (7, 9)]:  # out of order, as batches sorted by length arrive
        put[i] = Observation(rng.normal(size=(2, 6)).astype(np.float32), rng.normal(size=(2, 3, T)).astype(np.float32),
                             T - 1, rng.normal(size=(2, 3, 4)).astype(np.float32) if i == 0 else None, None, 0.5)
        store[i] = put[i]
    assert sorted(store) == [0, 3, 7] and len(store) == 3
    for i, o in put.items():
        got = store[i]
        assert got.h.dtype == np.float32 and got.n_query == o.n_query and got.scale == 0.5
        np.testing.assert_array_equal(got.h, o.h)
        np.testing.assert_array_equal(got.s_after, o.s_after)
        np.testing.assert_array_equal(got.s_query, o.s_after[:, :, : o.n_query])
        assert (got.q is None) == (o.q is None)
    assert all(not isinstance(v, np.ndarray) or v.size < 30 for entry in store._index.values() for v in entry)
    store.close()


def test_running_mean_equals_mean_defined_over_chunks():
    import numpy as np

    from iclgd.core import metrics as M

    x = np.random.default_rng(1).normal(size=(11, 4))
    x[[0, 3, 4], 1] = np.nan  # undefined examples on layer 1
    x[:, 3] = np.nan  # a layer with none
    one, many = M.RunningMean(), M.RunningMean()
    one.add(x)
    for a in range(0, 11, 3):
        many.add(x[a: a + 3])
    want_mean, want_n = M.mean_defined(x, axis=0)
    for rm in (one, many):
        mean, n = rm.result()
        np.testing.assert_array_equal(n, [11, 8, 11, 0])
        np.testing.assert_allclose(mean[:3], want_mean[:3], rtol=1e-14)
        assert np.isnan(mean[3])
    np.testing.assert_array_equal(one.result()[0][:3], want_mean[:3])  # one chunk: exactly


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gpt2", "tiny-random-gemma2", "tiny-random-opt"])
def test_kv_matrices_are_the_sums_of_value_key_outer_products(name):
    """W_ZSL (Eq. 6) and ΔW_ICL (Eq. 7) as dual.kv_matrices computes them (the reference of the captured ones) equal
    Σ_t v_t k_tᵀ by hand, over all tokens or a span, from the layer's own keys and values (float64)."""
    import torch

    from iclgd.core.hooks import Recorder
    from iclgd.core.models import load_model, qkv
    from iclgd.engine import dual

    lm = load_model(name, dtype="float64")
    prompt = [1, 5, 9, 13, 2, 7]
    with Recorder(lm, points=("attn_in",)) as rec, torch.no_grad():
        lm.model(input_ids=torch.tensor([prompt]))
    for span, (a, b) in [(None, (0, len(prompt))), ((1, 4), (1, 4))]:
        got = dual.kv_matrices(lm, prompt, span)
        assert len(got) == lm.n_layers
        for layer, W in enumerate(got):
            _, k, v, _ = qkv(lm, layer, rec.acts[f"attn_in.{layer}"][0], torch.arange(len(prompt)))
            by_hand = torch.stack([sum(torch.outer(v[h, t], k[h, t]) for t in range(a, b)) for h in range(k.shape[0])])
            torch.testing.assert_close(W, by_hand, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,position", [("tiny-random-llama", "last"), ("tiny-random-gpt2", "label-token"),
                                           ("tiny-random-gemma2", "last"), ("tiny-random-gptj", "last"),
                                           ("tiny-random-stablelm", "last"), ("tiny-random-phi", "last"),
                                           ("tiny-random-falcon-gqa", "last"), ("tiny-random-bloom", "last")])
def test_keys_and_values_captured_in_the_scoring_passes_give_w_zsl_and_dw_icl(name, position, data_dir):
    """W_ZSL (Eq. 6) of each ZSL prompt and ΔW_ICL (Eq. 7) from the keys and values the batched, prefix-cached scoring
    passes captured equal those of one plain forward pass of the prompt (dual.kv_matrices), in float64."""
    import torch

    from iclgd.core.models import load_model
    from iclgd.core.tasks import TASKS, load_task, sample_demos
    from iclgd.engine import dual
    from iclgd.engine.capture import Observer
    from iclgd.engine.scoring import build_prompts, score_options
    from iclgd.experiments.compare import _updates_from

    lm = load_model(name, dtype="float64")
    data = load_task(TASKS["sst2"], data_dir, n_test=5)
    icl = build_prompts(lm, TASKS["sst2"], sample_demos(data.demo_pool, 3, 1), data.eval_rows)
    zsl = build_prompts(lm, TASKS["sst2"], [], data.eval_rows)
    oz = Observer(lm, [], position, keep_q=0, keep_demo=0, keep_kv=4)
    oi = Observer(lm, [], position, keep_q=4, keep_demo=0, keep_prefix_kv=True)
    score_options(lm, zsl, batch_size=3, observer=oz)
    score_options(lm, icl, batch_size=3, observer=oi)
    assert oz.obs[4].kv is None and oi.obs[0].kv is None  # kept for the first keep_kv examples only
    label_tok = zsl.option_ids[0][:1] if position == "label-token" else []
    span = (len(zsl.prefix_ids), len(icl.prefix_ids))
    for got, want in zip([dual.kv_outer(*(torch.from_numpy(t[:, span[0]: span[1]]) for t in kv)) for kv in oi.prefix_kv],
                         dual.kv_matrices(lm, icl.prefix_ids, span)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    for j in range(4):
        want = dual.kv_matrices(lm, zsl.prefix_ids + zsl.query_ids[j] + label_tok)
        k, v = oz.obs[j].kv
        for layer, (kp, vp) in enumerate(oz.prefix_kv):
            got = dual.kv_outer(torch.from_numpy(np.concatenate([kp, k[layer]], 1)),
                                torch.from_numpy(np.concatenate([vp, v[layer]], 1)))
            torch.testing.assert_close(got, want[layer], rtol=1e-9, atol=1e-11)
    # the same model before and after: ΔW_FT is zero, its cosines undefined, its norm ratio 0
    upd = _updates_from(oz, oi, oz, span, 4, seed=1)
    assert upd["n_examples"] == 4 and math.isnan(upd["cos_dW"]["overall"]) and upd["norm_ratio_ft_over_icl"]["overall"] == 0


def _captures(lm, prompts, demo_pos):
    from iclgd.engine.capture import Observer
    from iclgd.engine.scoring import score_options

    obs = Observer(lm, demo_pos, keep_q=3, keep_demo=3, keep_kv=3, keep_prefix_kv=True)
    score_options(lm, prompts, batch_size=2, observer=obs)
    return obs


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gemma3", "tiny-random-gpt-neo"])
def test_keys_and_values_read_from_the_cache_equal_the_derived_ones_and_a_cache_holding_others_is_not_read(
        name, data_dir, monkeypatch):
    """Where the model's cache holds, layer by layer, the keys and values qkv derives (``check_layout`` sets
    ``lm.cache_kv``; every tiny family), the captures read the keys and values from the scoring passes' cache: the
    same captures as derived from ``attn_in`` again, to 1e-12 in float64. A cache that holds something else (here
    the keys stored negated after the attention used them) is found out by ``check_layout`` and not read."""
    from transformers.cache_utils import DynamicLayer

    from iclgd.core.models import check_layout, load_model
    from iclgd.core.tasks import TASKS, load_task, sample_demos
    from iclgd.engine.scoring import build_prompts

    lm = load_model(name, dtype="float64")
    assert lm.cache_kv
    data = load_task(TASKS["sst2"], data_dir, n_test=5)
    icl = build_prompts(lm, TASKS["sst2"], sample_demos(data.demo_pool, 3, 1), data.eval_rows)
    demo_pos = [i for a, b in icl.demo_spans for i in range(a, b)]
    oc = _captures(lm, icl, demo_pos)
    lm.cache_kv = False
    od = _captures(lm, icl, demo_pos)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)  # noqa: E731
    for (kc, vc), (kd, vd) in zip(oc.prefix_kv, od.prefix_kv):
        close(kc, kd), close(vc, vd)
    assert sorted(oc.obs) == sorted(od.obs) == list(range(5))
    for i in range(5):
        a, b = oc.obs[i], od.obs[i]
        close(a.h, b.h), close(a.s_after, b.s_after)
        for x, y in [(a.q, b.q), (a.s_demo, b.s_demo), *zip(a.kv or (), b.kv or ())]:
            assert (x is None) == (y is None)
            if x is not None:
                close(x, y)

    update = DynamicLayer.update

    def keys_stored_negated(self, key_states, value_states, *args, **kwargs):
        keys, values = update(self, key_states, value_states, *args, **kwargs)
        self.keys = -self.keys
        return keys, values

    monkeypatch.setattr(DynamicLayer, "update", keys_stored_negated)
    check_layout(lm)  # the attention itself is untouched, so the layout passes; the cache does not
    assert not lm.cache_kv
