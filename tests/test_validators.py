"""Label-free validators on synthetic predictions whose right ordering is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tlcore import validators as V

N, C = 200, 10


def _preds():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(N) % C
    noise = lambda s: torch.randn(N, C, generator=g) * s
    return {
        "confident": torch.nn.functional.one_hot(y, C) * 8.0 + noise(0.5),  # right-looking: sharp, every class used
        "collapsed": torch.nn.functional.one_hot(torch.zeros(N, dtype=torch.long), C) * 8.0 + noise(0.5),
        "uniform": noise(0.1),
        "scattered": noise(3.0),  # confident-ish but no cluster structure
    }


def test_entropy_prefers_confident_and_is_blind_to_collapse():
    p = _preds()
    assert V.entropy(p["confident"]) < V.entropy(p["scattered"]) < V.entropy(p["uniform"])
    assert V.entropy(p["uniform"]) == pytest.approx(np.log(C), abs=0.01)
    assert V.entropy(p["collapsed"]) == pytest.approx(V.entropy(p["confident"]), abs=0.01)  # its known failure


def test_im_and_bnm_want_confident_and_diverse():
    p = _preds()
    for fn in (V.information_maximization, V.bnm):
        assert fn(p["confident"]) > fn(p["scattered"]) > max(fn(p["collapsed"]), fn(p["uniform"])), fn.__name__
    assert V.information_maximization(p["confident"]) == pytest.approx(np.log(C), abs=0.05)
    assert V.bnm(p["confident"]) == pytest.approx(np.sqrt(C / N), rel=0.02)  # balanced one-hot: sqrt(N C) / N


def test_snd_prefers_dense_clusters_to_scattered_predictions():
    p = _preds()
    assert V.snd(p["confident"]) > V.snd(p["scattered"])
    assert V.snd(p["confident"]) == pytest.approx(np.log(N / C - 1), abs=0.05)  # uniform over its own cluster


def test_density_ratio_recovers_a_gaussian_shift():
    rng = np.random.default_rng(0)
    xs, xt = rng.normal(0, 1, (400, 2)), rng.normal(0, 1, (400, 2)) + [1.5, 0]
    w = V.density_ratio(xs[:200], xt, xs[200:])
    true = np.exp(1.5 * xs[200:, 0] - 1.125)  # N(1.5, 1) / N(0, 1) along the first axis
    assert np.corrcoef(np.log(w), np.log(true))[0, 1] > 0.98


def test_dev_weights_source_errors_by_where_the_target_is():
    """Two models err on equally many source images; A where the target is dense, B where it is sparse. Plain
    source risk ties them; DEV (an estimate of target risk) must rank B better (lower)."""
    rng = np.random.default_rng(0)
    xs, xt = rng.normal(0, 1, (400, 2)), rng.normal(0, 1, (400, 2)) + [1.5, 0]
    y = rng.integers(0, 3, 400)

    def logits(wrong):
        out = np.full((400, 3), -2.0)
        out[np.arange(400), np.where(wrong, (y + 1) % 3, y)] = 2.0
        return out

    rank = xs[:, 0].argsort().argsort()
    a, b = logits(rank >= 280), logits(rank < 120)  # 120 errors each: the largest / smallest first coordinates
    s = V.scores(torch.as_tensor(a), source=(xs, a, y), target_features=xt)
    assert V.dev(xs, b, y, xt) < s["dev"]
    assert set(s) == set(V.HIGHER_IS_BETTER)
    assert V.scores(torch.as_tensor(a))["dev"] is None


def test_features_and_logits_follow_backbone_then_head():
    from tlcore import models

    m = models.create("tinycnn", 4, in_channels=1)
    x, y = torch.randn(10, 1, 32, 32), torch.arange(10) % 4
    f, lg, yy = V.features_and_logits(m, [(x[:6], y[:6]), (x[6:], y[6:])], limit=8)
    assert f.shape == (8, m.out_features) and lg.shape == (8, 4) and torch.equal(yy, y[:8])
    m.eval()
    assert torch.allclose(lg, m(x[:8]), atol=1e-5)


def test_auto_validators_are_the_ones_the_selection_benchmark_found_best():
    """`tune.validator: auto` means, for `tl tune`'s search (and `tl rank`), and for finetune.strategy auto's choice
    with no target labels, the validator docs/selection_benchmark.json measured best for that use (lowest mean
    regret, bench.selection.best_validator), and the README's generated paragraph says which: a re-run that finds
    another best fails here until tasks.project.measured follows it."""
    import json

    from helpers import ROOT

    from bench.selection import POOL_ONLY, TRUST, best_validator
    from tasks.project.config import Tune
    from tasks.project.measured import AUTO_STRATEGY_VALIDATOR, AUTO_VALIDATOR, VALIDATORS, resolve_validator

    state = json.loads((ROOT / "docs" / "selection_benchmark.json").read_text())
    assert not state["settings"]["quick"] and len(state["rows"]) >= 2  # the full run, more than one domain pair
    assert set(POOL_ONLY) == set(VALIDATORS) and set(VALIDATORS) <= set(V.HIGHER_IS_BETTER)
    assert best_validator(state) == AUTO_VALIDATOR == resolve_validator("auto") == resolve_validator("auto", "search")
    assert best_validator(state, "strategy") == AUTO_STRATEGY_VALIDATOR == resolve_validator("auto", "strategy")
    assert resolve_validator("bnm", "strategy") == "bnm" and Tune().validator == "auto"
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index(f"<!-- {TRUST}:start -->") : readme.index(f"<!-- {TRUST}:end -->")]
    assert f"`auto` is **{AUTO_VALIDATOR}**" in block and f"`auto` is **{AUTO_STRATEGY_VALIDATOR}**" in block
