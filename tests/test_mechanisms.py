"""Task vectors and function vectors (iclgd.engine.mechanisms) on cases whose answer is known: a patch that writes
back what was there changes nothing (so the patch sits where it should); the batched single-token pass of the
indirect effects equals a whole forward pass with the head patched; the heads' outputs through W_O sum to the
attention output; and the experiment end to end on a tiny model."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from iclgd.core.hooks import Recorder
from iclgd.core.models.tiny import build_tiny
from iclgd.core.tasks import TaskSpec
from iclgd.engine import mechanisms as E
from iclgd.engine.scoring import build_prompts, score_options

SPEC = TaskSpec(name="toy", template="Review: {text}\nSentiment:", label_words=("bad", "good"),
                fields={"text": "text"}, demo_file="-", eval_file="-")
ROWS = [{"text": t, "label": i % 2, "idx": i} for i, t in enumerate(
    ["a fine film", "dull", "so so, really", "great fun!", "no", "a long and winding story", "yes", "meh"])]
FAMILIES = ["tiny-random-llama", "tiny-random-gpt2", "tiny-random-gemma3", "tiny-random-qwen3"]


@pytest.mark.parametrize("name", FAMILIES)
def test_unpatched_scores_are_the_scoring_engines(name):
    lm = build_tiny(name)
    p = build_prompts(lm, SPEC, [], ROWS)
    np.testing.assert_allclose(E.score_patched(lm, p, list(range(len(ROWS))), batch_size=3), score_options(lm, p),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_writing_back_the_residual_changes_nothing_and_another_vector_does(name):
    """Replace the residual entering block L at each row's last query position by that same residual (read from the
    prompt's own forward pass): the scores are unchanged at every L; a perturbed vector changes them. A patch one
    position off would not write back what was there."""
    lm = build_tiny(name)
    p = build_prompts(lm, SPEC, [], ROWS[:1])
    ref = E.score_patched(lm, p, [0])
    own = E.last_position_acts(lm, p, [0], ("block_in",))["block_in"][0]  # (L, d_model)
    for L in range(lm.n_layers):
        same = E.score_patched(lm, p, [0], L, own[L], "replace")
        np.testing.assert_allclose(same, ref, atol=1e-5, rtol=0)
        zero_add = E.score_patched(lm, p, [0], L, torch.zeros_like(own[L]), "add")
        np.testing.assert_allclose(zero_add, ref, atol=1e-6, rtol=0)
    moved = E.score_patched(lm, p, [0], 1, own[1] + 5 * torch.randn_like(own[1]), "replace")
    assert np.abs(moved - ref).max() > 1e-4


MULTI = TaskSpec(name="toy-multi", template="Review: {text}\nSentiment:", label_words=("rather bad", "very good indeed"),
                 fields={"text": "text"}, demo_file="-", eval_file="-")


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("spec", [SPEC, MULTI], ids=["one-token", "multi-token"])
@pytest.mark.parametrize("n_demos", [0, 3, "no-start-token"])
def test_several_edits_at_once_equal_one_whole_pass_per_edit(name, spec, n_demos):
    """patched_scores runs each query's context once and every edit as a row over its cache: the scores of every
    (layer, vector, mode) equal score_patched's, which runs every row whole. Also with an empty prefix (zero-shot,
    no start token), where each query's context gets a cache of its own."""
    lm = build_tiny(name)
    if n_demos == "no-start-token":
        lm.use_start, n_demos = False, 0
    p = build_prompts(lm, spec, ROWS[:n_demos], ROWS[3:7])
    ex = [0, 2, 3]
    g = torch.Generator().manual_seed(1)
    d = lm.model.config.hidden_size
    edits = [(L, torch.randn(d, generator=g), mode) for L in range(lm.n_layers) for mode in ("replace", "add")]
    got = E.patched_scores(lm, p, ex, edits, batch_size=3)  # rows in chunks of 12 (single) or 3: several chunks
    assert got.shape == (len(edits), len(ex), len(spec.label_words))
    for e, (L, v, mode) in enumerate(edits):
        np.testing.assert_allclose(got[e], E.score_patched(lm, p, ex, L, v, mode), atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_head_outputs_through_w_o_sum_to_the_attention_output(name):
    lm = build_tiny(name)
    p = build_prompts(lm, SPEC, ROWS[:2], ROWS[2:5])
    acts = E.last_position_acts(lm, p, [0, 1, 2], ("attn_heads", "attn_out"))
    per_head = E.head_outputs(lm, acts["attn_heads"])  # (n, L, H, d_model)
    for l in range(lm.n_layers):
        o = lm.o_proj(l)
        bias = 0 if getattr(o, "bias", None) is None else o.bias.float()
        torch.testing.assert_close(per_head[:, l].sum(1) + bias, acts["attn_out"][:, l], atol=1e-5, rtol=1e-5)


def test_batched_indirect_effects_equal_one_whole_forward_pass_per_patched_head():
    lm = build_tiny("tiny-random-llama")
    shuffled = [{**d, "label": 1 - d["label"]} for d in ROWS[:3]]
    corrupted = build_prompts(lm, SPEC, shuffled, ROWS[5:7])  # two queries after the same shuffled demonstrations
    H, _, hd = lm.head_counts()
    g = torch.Generator().manual_seed(0)
    means = torch.randn(lm.n_layers, H, hd, generator=g)
    cie = E.causal_indirect_effects(lm, corrupted, means, batch_size=3)  # chunks of 3 rows: several chunks
    assert cie.shape == (lm.n_layers, H)

    def prob(i, patch=None):
        p = corrupted
        ids = torch.tensor([p.prefix_ids + p.query_ids[i]])
        edit = {}
        if patch is not None:
            l, h = patch

            def edit_fn(x):
                x = x.clone()
                x[0, -1, h * hd:(h + 1) * hd] = means[l, h]
                return x
            edit = {"attn_heads": edit_fn}
        with torch.no_grad(), Recorder(lm, points=(), edit=edit, layers=[patch[0]] if patch else []):
            logits = lm.model(input_ids=ids).logits[0, -1].double()
        return torch.softmax(logits, -1)[p.option_ids[p.labels[i]][0]].item()

    for l, h in [(0, 0), (1, H - 1), (lm.n_layers - 1, 1)]:
        want = np.mean([prob(i, (l, h)) - prob(i) for i in range(2)])
        assert abs(cie[l, h].item() - want) < 1e-6, (l, h)


def test_setting_a_head_to_its_own_output_has_no_indirect_effect():
    lm = build_tiny("tiny-random-llama")
    p = build_prompts(lm, SPEC, ROWS[:3], [ROWS[6]])
    heads = E.last_position_acts(lm, p, [0], ("attn_heads",))["attn_heads"]  # (1, L, H·hd)
    H, _, hd = lm.head_counts()
    cie = E.causal_indirect_effects(lm, p, heads[0].view(lm.n_layers, H, hd))
    assert cie.abs().max() < 1e-6


def test_shuffled_labels_keep_the_label_counts_and_move_every_label():
    from iclgd.experiments.mechanisms import shuffled_labels

    demos = [{"text": str(i), "label": i % 2} for i in range(8)]
    sh = shuffled_labels(demos, seed=3)
    assert sorted(d["label"] for d in sh) == sorted(d["label"] for d in demos)
    assert all(a["label"] != b["label"] for a, b in zip(demos, sh))
    assert [d["text"] for d in sh] == [d["text"] for d in demos]
    assert shuffled_labels(demos, seed=3) == sh


def test_head_agreement_by_hand():
    from iclgd.experiments.mechanisms import head_agreement

    cie = np.array([[0.9, 0.1], [0.5, -0.2]])
    same = head_agreement(cie, cie * 2, top=2)
    assert same["spearman"] == pytest.approx(1.0) and same["top_overlap"] == 2 and same["chance_overlap"] == 1.0
    rev = head_agreement(cie, -cie, top=1)
    assert rev["spearman"] == pytest.approx(-1.0) and rev["top_overlap"] == 0


def test_task_vectors_are_the_mean_of_the_dummy_prompts_states():
    lm = build_tiny("tiny-random-llama")
    p = build_prompts(lm, SPEC, ROWS[:2], ROWS[4:7])
    theta = E.task_vectors(lm, p, batch_size=2)
    one = [E.last_position_acts(lm, build_prompts(lm, SPEC, ROWS[:2], [r]), [0])["block_in"][0] for r in ROWS[4:7]]
    torch.testing.assert_close(theta, torch.stack(one).mean(0), atol=1e-5, rtol=1e-5)


def test_the_dual_form_alignment_is_a_cosine_per_layer_and_its_baseline_is_near_zero():
    lm = build_tiny("tiny-random-llama")
    icl, zsl = build_prompts(lm, SPEC, ROWS[:3], ROWS[3:8]), build_prompts(lm, SPEC, [], ROWS[3:8])
    out = E.dual_form_alignment(lm, icl, zsl, list(range(5)), generator=torch.Generator().manual_seed(0))
    for k in ("cos_delta_dw_q", "cos_random"):
        assert out[k].shape == (lm.n_layers,) and np.all(np.abs(out[k]) <= 1 + 1e-9)
    assert not np.allclose(out["cos_delta_dw_q"], out["cos_random"])


def test_mechanisms_command_end_to_end(data_dir, tmp_path):
    from iclgd.cli import app

    out = tmp_path / "mech"
    args = ["mechanisms", "--model", "tiny-random-llama", "--n-test", "6", "--k", "2", "--n-dev", "4", "--n-dummy", "2",
            "--n-cie", "2", "--n-link", "3", "--updates-n", "3", "--kendall-n", "3", "--induction-seqs", "2",
            "--induction-len", "8"]
    res = CliRunner().invoke(app, [*args, "--seeds", "1,2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "results.json").read_text())
    assert doc["kind"] == "iclgd.mechanisms" and len(doc["seeds"]) == 2 and len(doc["untrained"]["seeds"]) == 2
    L = 2  # tiny-random-llama's layers
    for r in doc["seeds"]:
        assert len(r["task_vector"]["dev_curve"]) == L and 0 <= r["task_vector"]["layer"] < L
        assert len(r["function_vector"]["cie_per_head"]) == L
        assert 0 <= r["acc"]["task_vector"] <= 1 and 0 <= r["shuffled_labels"]["acc_icl"] <= 1
        dev, dummy, cie = (set(r["side_rows"][k]) for k in ("dev_idx", "dummy_idx", "cie_idx"))
        demos = set(r["demo_idx"])
        assert not (dev & dummy or dev & cie or dummy & cie or demos & (dev | dummy | cie))
    assert "task vector acc" in res.output and "untrained" in res.output
    recs = [json.loads(l) for l in (out / "records.jsonl").read_text().splitlines()]
    assert len(recs) == 24 and {"tv_pred", "fv_pred", "icl_pred", "input"} <= set(recs[0])
    assert [r["condition"] for r in recs] == ["trained"] * 12 + ["untrained"] * 12  # the control's records too
    # a seed's figures do not depend on the seeds run before it (a long run may be split into one folder per seed)
    alone = tmp_path / "mech-s2"
    res2 = CliRunner().invoke(app, [*args, "--seeds", "2", "--out", str(alone)])
    assert res2.exit_code == 0, res2.output
    doc2 = json.loads((alone / "results.json").read_text())
    same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # noqa: E731
    assert same(doc["seeds"][1], doc2["seeds"][0]) and same(doc["untrained"]["seeds"][1], doc2["untrained"]["seeds"][0])


def test_reproduce_runs_mechanisms_units_and_reports_them(data_dir, tmp_path):
    from iclgd.cli import app

    out = tmp_path / "rep"
    res = CliRunner().invoke(app, ["reproduce", "--model", "tiny-random-llama", "--tasks", "sst2", "--seeds", "1",
                                   "--n-test", "4", "--k", "2", "--mechanisms", "--no-dual", "--no-synthetic",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    units = sorted(p.parent.name for p in (out / "units").glob("*/result.json"))
    assert units == ["compare-sst2-s1", "compare-sst2-s1-untrained", "mechanisms-sst2-s1",
                     "mechanisms-sst2-s1-untrained"]
    doc = json.loads((out / "units" / "mechanisms-sst2-s1" / "result.json").read_text())
    assert len(doc["result"]["induction"]["prefix_matching"]) == 2
    report = (out / "report.md").read_text()
    assert "## The rival accounts" in report and "| task vector acc |" in report
    assert (out / "plots" / "mechanisms_sst2.png").is_file()
