import pytest
import torch

from iclgd.experiments import synthetic as S


@pytest.mark.parametrize("layers,gamma", [(1, 0.0), (3, 0.0), (2, 0.3)])
def test_construction_is_exactly_gd_without_training(layers, gamma):
    g = torch.Generator().manual_seed(layers)
    t = S.sample_tasks(128, 15, 6, g)
    m = S.gd_construction(6, 0.8, layers, gamma)
    y_lsa = m(S.tokens(t), 15)
    if gamma == 0.0:
        ref = S.gd_predict(t, 0.8, layers)  # autograd GD on W: an independent route
    else:  # GD++: preconditioned inputs x <- (I - γ XXᵀ/N) x before each GD step
        X, xq, r, pred = t.X.clone(), t.xq.clone(), t.y.clone(), torch.zeros_like(t.yq)
        for _ in range(layers):
            G = torch.einsum("bnd,bne->bde", X, X) / 15
            upd = torch.einsum("bn,bnd->bd", r, X) / 15
            pred = pred + 0.8 * torch.einsum("bd,bd->b", upd, xq)
            r = r - 0.8 * torch.einsum("bd,bnd->bn", upd, X)
            X, xq = X - gamma * torch.einsum("bde,bne->bnd", G, X), xq - gamma * torch.einsum("bde,be->bd", G, xq)
        ref = pred
    assert ((y_lsa - ref).abs().max() / ref.abs().max()).item() <= 1e-5


def test_hand_computed_one_step():
    """d = 1, two examples (x, y) = (1, 2), (−1, −2), η = 0.5: W = η·mean(y x) = 1, so ŷ(x_q = 0.5) = 0.5."""
    t = S.Tasks(X=torch.tensor([[[1.0], [-1.0]]], dtype=torch.float64), y=torch.tensor([[2.0, -2.0]], dtype=torch.float64),
                xq=torch.tensor([[0.5]], dtype=torch.float64), yq=torch.tensor([1.0], dtype=torch.float64), w=None)
    assert S.gd_construction(1, 0.5)(S.tokens(t), 2).item() == pytest.approx(0.5)
    assert S.gd_predict(t, 0.5).item() == pytest.approx(0.5)


def test_softmax_attention_with_zero_query_weights_predicts_the_mean_label():
    """Hand-computed: W_Q = 0 makes softmax attention uniform, so with W_V picking −y and P = I, ŷ = mean(y_j)."""
    t = S.Tasks(X=torch.tensor([[[1.0], [-1.0], [0.5]]], dtype=torch.float64),
                y=torch.tensor([[2.0, -2.0, 3.0]], dtype=torch.float64),
                xq=torch.tensor([[0.7]], dtype=torch.float64), yq=torch.tensor([0.0], dtype=torch.float64), w=None)
    m = S.RegressionTransformer(1, attention="softmax")
    with torch.no_grad():
        m.WK[:] = torch.randn(2, 2, dtype=torch.float64)  # keys do not matter when the query is zero
        m.WV[0, 0, 1, 1] = -1.0
        m.P[:] = torch.eye(2, dtype=torch.float64)
    assert m(S.tokens(t), 3).item() == pytest.approx(1.0)  # (2 − 2 + 3) / 3


def test_mlp_with_zero_weights_changes_nothing_and_with_weights_changes_the_query():
    g = torch.Generator().manual_seed(3)
    t = S.sample_tasks(16, 8, 4, g)
    plain = S.gd_construction(4, 0.7, 2)
    with_mlp = S.RegressionTransformer(4, 2, mlp_hidden=6, dtype=torch.float64)
    with_mlp.load_state_dict({**plain.state_dict(), "W1": with_mlp.W1, "W2": with_mlp.W2})
    E = S.tokens(t)
    assert torch.equal(with_mlp(E, 8), plain(E, 8))
    with torch.no_grad():
        with_mlp.W1.normal_(generator=g)
        with_mlp.W2.normal_(generator=g)
    assert (with_mlp(E, 8) - plain(E, 8)).abs().max() > 1e-3


def test_linear_attention_sign_symmetry_is_fixed_for_simam_and_kendall():
    """(W_K, W_V) → (−W_K, −W_V) leaves every prediction unchanged but flips the raw scores; the sign-fixed maps
    (and so SimAM/Kendall) must not move, the unsigned ones must flip."""
    g = torch.Generator().manual_seed(5)
    t = S.sample_tasks(64, 10, 4, g)
    m = S.gd_construction(4, 0.9)
    flipped = S.gd_construction(4, 0.9)
    with torch.no_grad():
        flipped.WK.neg_()
        flipped.WV.neg_()
    E = S.tokens(t)
    assert torch.allclose(m(E, 10), flipped(E, 10), atol=1e-12)
    a, b = S.calibration(m, t, 0.9), S.calibration(flipped, t, 0.9)
    assert a["simam"] == pytest.approx(1.0) and a["kendall"] == pytest.approx(1.0)
    assert b["simam"] == pytest.approx(1.0) and b["kendall"] == pytest.approx(1.0)
    assert a["simam_raw"] == pytest.approx(1.0) and b["simam_raw"] == pytest.approx(-1.0)
    assert b["kendall_raw"] == pytest.approx(-1.0)


def test_short_training_beats_zero_and_approaches_gd_and_calibrates_metrics():
    r = S.run(S.SyntheticConfig(d=5, n_ctx=10, layers=1, steps=400, seed=0, n_eval=512, lr=1e-2), progress=False)
    loss = r["loss"]
    assert loss["trained"] < 0.6 * loss["zero"]
    assert loss["trained"] <= 1.10 * loss["gd_1step"]  # within 10 % of one-step GD after 400 steps
    assert r["trained_vs_gd"]["sensitivity_cos"] > 0.9
    cal = r["calibration"]
    for metric in ("simaou", "simam", "kendall"):
        assert cal["construction"][metric] >= 0.99, metric
        assert cal["untrained"][metric] < 0.5, metric
        assert cal["trained"][metric] > cal["untrained"][metric] + 0.3, metric
        assert abs(cal["construction"][f"{metric}_random"]) < 0.1, metric
    assert cal["construction"]["rec2ftp"] == 1.0 and cal["untrained"]["rec2ftp"] < 0.5


def test_softmax_and_mlp_variants_train_and_cli_writes_outputs(tmp_path):
    from typer.testing import CliRunner

    from iclgd.cli import app

    res = CliRunner().invoke(app, ["synthetic", "--dim", "4", "--n-context", "8", "--steps", "300", "--lr", "0.01",
                                   "--n-eval", "256", "--attention", "softmax", "--mlp-hidden", "8", "--seed", "2",
                                   "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "Kendall | rand" in res.output and "softmax-attention" in res.output
    import json

    r = json.loads((tmp_path / "results.json").read_text())
    assert r["config"]["attention"] == "softmax" and r["config"]["mlp_hidden"] == 8
    assert r["loss"]["trained"] < 0.8 * r["loss"]["zero"]
    assert set(r["calibration"]) == {"construction", "trained", "untrained"}
    assert len(r["calibration"]["trained"]["kendall_per_layer"]) == 1
    assert (tmp_path / "loss.png").stat().st_size > 0 and (tmp_path / "sensitivities.png").stat().st_size > 0


def test_report_shows_the_synthetic_calibration_from_its_result_file(tmp_path):
    import json

    from iclgd.core.io import atomic_write_json
    from iclgd.report import write_report

    r = S.run(S.SyntheticConfig(d=3, n_ctx=6, layers=1, steps=50, seed=0, n_eval=64, lr=1e-2), progress=False)
    r.pop("_sens")
    atomic_write_json(tmp_path / "sweep.json", {"config": {"model": "none", "tasks": [], "seeds": [0], "n_test": 0},
                                                "units": ["synthetic-1L"]})
    (tmp_path / "units" / "synthetic-1L").mkdir(parents=True)
    atomic_write_json(tmp_path / "units" / "synthetic-1L" / "result.json",
                      {"unit": {"id": "synthetic-1L", "kind": "synthetic", "params": {}}, **json.loads(json.dumps(r))})
    text = write_report(tmp_path).read_text()
    assert "## Calibration on a known case" in text
    row = next(x for x in text.splitlines() if x.startswith("| construction |"))
    assert row.count("1.000") >= 4  # Rec2FTP, SimAOU, SimAM, Kendall of the exact construction
    header = text.splitlines()[text.splitlines().index(row) - 2]
    n_cols = lambda line: len(line.replace("\\|", "").strip("|").split("|"))  # noqa: E731
    assert n_cols(header) == n_cols(row) == 6  # "SimAOU | rand" is one escaped column, not two
    import pandas as pd

    csv = pd.read_csv(tmp_path / "results.csv")
    got = {(c, m) for c, m in zip(csv.condition, csv.metric)}
    assert ("untrained", "kendall") in got and ("construction", "simam") in got
    # a unit written before SimAM/Kendall were calibrated: the report says how to recompute it, and does not crash
    old = {**r, "calibration": {k: {m: v[m] for m in ("simaou", "simaou_random", "rec2ftp", "rec2ftp_den")}
                                for k, v in r["calibration"].items()}}
    atomic_write_json(tmp_path / "units" / "synthetic-1L" / "result.json",
                      {"unit": {"id": "synthetic-1L", "kind": "synthetic", "params": {}}, **old})
    assert "delete that folder and rerun" in write_report(tmp_path).read_text()


def test_several_seeds_give_a_summary_with_cis_and_per_seed_folders(tmp_path):
    from typer.testing import CliRunner

    from iclgd.cli import app

    res = CliRunner().invoke(app, ["synthetic", "--dim", "3", "--n-context", "6", "--steps", "30", "--lr", "0.01",
                                   "--n-eval", "64", "--seeds", "1,2,3", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    import json

    per_seed = [json.loads((tmp_path / f"seed-{s}" / "results.json").read_text()) for s in (1, 2, 3)]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seeds"] == [1, 2, 3] and "seed" not in summary["config"]
    vals = [r["calibration"]["untrained"]["simam"] for r in per_seed]
    mean, lo, hi = summary["calibration"]["untrained"]["simam"]
    assert mean == pytest.approx(sum(vals) / 3) and min(vals) <= lo <= mean <= hi <= max(vals)
    assert summary["calibration"]["construction"]["kendall"] == pytest.approx([1.0, 1.0, 1.0])
    assert (tmp_path / "calibration.png").stat().st_size > 0 and "95% bootstrap CI" in res.output
