import pytest
import torch

from iclgd import synthetic as S


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


def test_short_training_beats_zero_and_approaches_gd_and_calibrates_metrics():
    r = S.run(d=5, n_ctx=10, layers=1, steps=400, seed=0, n_eval=512, progress=False, lr=1e-2)
    loss = r["loss"]
    assert loss["trained_lsa"] < 0.6 * loss["zero"]
    assert loss["trained_lsa"] <= 1.10 * loss["gd_1step"]  # within 10 % of one-step GD after 400 steps
    assert r["trained_vs_gd"]["sensitivity_cos"] > 0.9
    cal = r["calibration"]
    assert cal["construction"]["simaou"] >= 0.99 and cal["construction"]["rec2ftp"] == 1.0
    assert cal["untrained"]["simaou"] < 0.5 and cal["trained"]["simaou"] > cal["untrained"]["simaou"] + 0.3
    assert abs(cal["construction"]["simaou_random"]) < 0.1
