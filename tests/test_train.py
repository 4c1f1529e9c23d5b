import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from iclgd.core.errors import IclgdError
from iclgd.engine.train import TrainConfig, batch_at, load_corpus, lr_at, perplexity, pretrain


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, data_dir):
    """The first 60 KB of Tiny Shakespeare: enough for the tiny model, quick to tokenize."""
    text = (data_dir / "corpora" / "tinyshakespeare" / "input.txt").read_text()[:60000]
    path = tmp_path_factory.mktemp("corpus") / "shakespeare60k.txt"
    path.write_text(text)
    return str(path)


def tiny(corpus="tinyshakespeare", **kw):
    base = dict(corpus=corpus, size="tiny", steps=12, batch_size=2, eval_every=6, ckpt_every=3,
                eval_tokens=2048, warmup=2, lr=1e-2, min_lr=1e-3)
    base.update(kw)
    return TrainConfig(**base)


def test_resume_after_interruption_matches_uninterrupted(tmp_path, small_corpus):
    full = pretrain(tiny(small_corpus), tmp_path / "full", progress=False)
    # interrupted after 7 steps: the last checkpoint is at step 6, so step 7 is redone on resume
    assert pretrain(tiny(small_corpus), tmp_path / "cut", progress=False, stop_after=7) == {"stopped_at": 7}
    resumed = pretrain(tiny(small_corpus), tmp_path / "cut", progress=False)
    assert resumed["final_train_loss"] == full["final_train_loss"]
    a = load_file(str(tmp_path / "full" / "ckpt" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "ckpt" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = list(csv.DictReader(open(tmp_path / "cut" / "log.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    assert rows == list(csv.DictReader(open(tmp_path / "full" / "log.csv")))


def test_momentum_training_runs_and_learns(tmp_path, small_corpus):
    pretrain(tiny(small_corpus, attention="momentum", eta=0.5, learnable_eta=True, steps=30, eval_every=30, ckpt_every=30),
                 tmp_path / "m", progress=False)
    rows = list(csv.DictReader(open(tmp_path / "m" / "log.csv")))
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert json.loads((tmp_path / "m" / "config.json").read_text())["attention"] == "momentum"
    sd = load_file(str(tmp_path / "m" / "ckpt" / "model.safetensors"))
    assert any("momentum_theta" in k for k in sd)


def test_same_seed_same_init_and_data_for_both_variants():
    from iclgd.engine.train import build_model

    a, b = build_model(tiny(), 300), build_model(tiny(attention="momentum"), 300)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    data = torch.arange(1000)
    assert torch.equal(batch_at(data, 5, 1, 2, 16), batch_at(data, 5, 1, 2, 16))
    assert not torch.equal(batch_at(data, 5, 1, 2, 16), batch_at(data, 6, 1, 2, 16))


def test_lr_schedule_and_perplexity_of_uniform_model():
    cfg = tiny(steps=100, warmup=10, lr=1.0, min_lr=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 99) == pytest.approx(0.1, abs=1e-3)

    class Uniform(torch.nn.Module):
        training = False

        def forward(self, input_ids):
            return type("O", (), {"logits": torch.zeros(*input_ids.shape, 50)})()

    assert perplexity(Uniform(), torch.randint(0, 50, (200,)), 16) == pytest.approx(50.0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(attention="momentum", eta=1.0), "strictly between 0 and 1"),
    (dict(attention="linear"), "--attention"),
    (dict(size="huge"), "--size"),
])
def test_bad_training_options(tmp_path, kwargs, message):
    with pytest.raises(IclgdError, match=message):
        pretrain(tiny(**kwargs), tmp_path, progress=False)


def test_corpus_errors(tmp_path, data_dir):
    with pytest.raises(IclgdError, match="unknown corpus"):
        load_corpus("wikitext-103")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(IclgdError, match="empty"):
        load_corpus(str(empty))
    c = load_corpus("austen")
    assert len(c.train) > 10 * len(c.valid) > 0 and len(c.files) == 3


def test_momentum_compare_study_tiny(tmp_path, small_corpus):
    from iclgd.experiments.momentum import MomentumConfig, run
    from iclgd.report.plots import plot_curves

    cfg = MomentumConfig(small_corpus, [1], 0.9, size="tiny", steps=4, lengths=(32, 64),
                         train=dict(eval_every=4, ckpt_every=4, eval_tokens=1024))
    doc = run(cfg, tmp_path, progress=False)
    assert set(doc["runs"]) == {"vanilla-s1", "momentum-s1"}
    s = doc["summary"]["ppl@32"]
    assert s["paired_diff_momentum_minus_vanilla"][0] == pytest.approx(s["momentum"][0] - s["vanilla"][0])
    plot_curves(tmp_path, [1])  # from the runs' log.csv files alone
    assert (tmp_path / "val_curves.png").stat().st_size > 1000
    again = run(cfg, tmp_path, progress=False)  # finished runs are not retrained
    assert again["runs"] == doc["runs"]
    with pytest.raises(IclgdError, match="exceed the model's context"):
        run(MomentumConfig(small_corpus, [1], 0.9, size="tiny", lengths=(128,)), tmp_path, progress=False)


def test_the_one_training_loop_applies_the_schedule_and_resumes_on_it():
    """engine.train.fit (issue 23): pretraining and world training share it; each step runs at lr_at(cfg, step),
    from step 0 or resumed from any step, and after_step sees every step once."""
    import types

    import torch

    from iclgd.engine import train as T
    from iclgd.engine import world as W

    assert W.train.__code__.co_names.count("fit") and T.pretrain.__code__.co_names.count("fit")
    cfg = types.SimpleNamespace(lr=0.1, min_lr=0.01, warmup=3, steps=12, grad_clip=1.0)
    for start in (0, 5):
        model = torch.nn.Linear(2, 1)
        opt = torch.optim.AdamW(model.parameters(), lr=123.0)  # a restored optimizer's stale rate is replaced
        seen, rates = [], []

        def loss_at(step):
            rates.append(opt.param_groups[0]["lr"])
            return model(torch.ones(1, 2)).pow(2).sum()

        loss, stopped = T.fit(model, opt, cfg, start, loss_at, lambda step, loss: seen.append(step), "t", False)
        assert stopped is None and seen == list(range(start, cfg.steps))
        assert rates == pytest.approx([T.lr_at(cfg, s) for s in range(start, cfg.steps)], rel=1e-12)
    _, stopped = T.fit(torch.nn.Linear(2, 1), torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=1), cfg, 0,
                       lambda s: torch.zeros((), requires_grad=True), lambda s, l: None, "t", False, stop_after=4)
    assert stopped == 4
