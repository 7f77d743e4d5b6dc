"""Label-free validators: values against skada's scorers and hand computations, directions, bad input."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmkd.validators import (
    VALIDATORS,
    ValidationInputs,
    ValidatorWarning,
    batch_nuclear_norm,
    compute_validators,
    deep_embedded_validation,
    dev_score,
    greater_is_better,
    information_maximization,
    logistic_regression_proba,
    prediction_entropy,
    soft_neighborhood_density,
    source_accuracy,
    zero_shot_agreement,
)


def logits(n=40, c=5, seed=0, scale=3.0):
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed)) * scale


# ---------------------------------------------------------------------------------------------- against skada
skada_metrics = pytest.importorskip("skada.metrics", reason="skada (dev extra) is not installed")
from sklearn.base import BaseEstimator, ClassifierMixin  # noqa: E402


class _FixedLinear(ClassifierMixin, BaseEstimator):
    """A fitted 'classifier' whose probabilities are softmax(X @ W): the same outputs for skada and for us."""

    def __init__(self, weight):
        self.weight = weight
        self.classes_ = np.arange(weight.shape[1])

    def fit(self, X, y=None, **kw):
        return self

    def predict_proba(self, X, **kw):
        z = X @ self.weight
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, X, **kw):
        return self.predict_proba(X).argmax(axis=1)


def _domain_data(seed=0, n_s=60, n_t=50, d=6, c=4):
    rng = np.random.default_rng(seed)
    xs = rng.normal(size=(n_s, d))
    xt = rng.normal(loc=0.4, size=(n_t, d))
    w = rng.normal(size=(d, c)) * 2
    ys = (xs @ w + rng.normal(scale=1.0, size=(n_s, c))).argmax(axis=1)
    return xs, ys, xt, w


def _skada_score(scorer, estimator, xs, ys, xt):
    x = np.concatenate([xs, xt])
    y = np.concatenate([ys, -np.ones(len(xt), dtype=int)])
    domain = np.concatenate([np.ones(len(xs), dtype=int), -np.ones(len(xt), dtype=int)])
    return scorer(estimator, x, y, sample_domain=domain)


def test_entropy_and_snd_match_skada():
    xs, ys, xt, w = _domain_data()
    est = _FixedLinear(w)
    target_logits = torch.from_numpy(xt @ w)
    ent = _skada_score(skada_metrics.PredictionEntropyScorer(), est, xs, ys, xt)
    # skada averages -p log(p + 1e-7) over samples *and classes* (C = 4 here): ours sums over classes
    assert prediction_entropy(target_logits) == pytest.approx(-ent * w.shape[1], abs=1e-5)
    snd = _skada_score(skada_metrics.SoftNeighborhoodDensity(), est, xs, ys, xt)
    assert soft_neighborhood_density(target_logits) == pytest.approx(snd, rel=1e-5)  # ours in float32


def test_dev_matches_skada_on_the_same_split():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    class _Pipe(Pipeline):  # skada passes sample_domain/allow_source, which plain sklearn refuses to route
        def predict_proba(self, X, **params):
            return self.steps[-1][1].predict_proba(self[:-1].transform(X))

    xs, ys, xt, w = _domain_data(seed=3)
    pipe = _Pipe([("features", FunctionTransformer()), ("clf", _FixedLinear(w))])
    pipe.fit(xs, ys)

    # skada 0.6's default loss returns shape (n,), which its (n, 1) weights broadcast to an (n, n) matrix; a loss
    # returning a column gives You et al.'s Alg. 1, which is what we compute
    def column_ce(y, p):
        return -np.log(np.clip(p[np.arange(len(y)), y], 1e-15, 1 - 1e-15))[:, None]

    scorer = skada_metrics.DeepEmbeddedValidation(random_state=0, loss_func=column_ce)
    theirs = _skada_score(scorer, pipe, xs, ys, xt)
    fit, val, _, y_val = train_test_split(xs, ys, test_size=0.33, random_state=np.random.RandomState(0))
    probs = _FixedLinear(w).predict_proba(val)
    ours = deep_embedded_validation(fit, val, probs, y_val, xt, domain_classifier=LogisticRegression())
    assert ours == pytest.approx(-theirs, rel=1e-6)
    # the default domain classifier (Newton on the same objective) lands on the same optimum, up to the tolerance at
    # which scikit-learn's lbfgs stops (tol=1e-4)
    assert deep_embedded_validation(fit, val, probs, y_val, xt) == pytest.approx(-theirs, rel=2e-3)


def test_logistic_regression_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 5))
    y = (x[:, 0] + 0.5 * rng.normal(size=200) > 0).astype(float)
    q = rng.normal(size=(30, 5))
    expected = LogisticRegression(C=0.5, tol=1e-10, max_iter=1000).fit(x, y).predict_proba(q)
    np.testing.assert_allclose(logistic_regression_proba(x, y, q, C=0.5), expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------- definitions
def test_values_match_hand_computations():
    z = logits()
    p = F.softmax(z.double(), dim=-1)
    h = -(p * p.log()).sum(-1)
    assert information_maximization(z) == pytest.approx(float(-(p.mean(0) * p.mean(0).log()).sum() - h.mean()))
    assert batch_nuclear_norm(z) == pytest.approx(float(torch.linalg.svdvals(p).sum() / len(p)))
    ids = z.argmax(-1).clone()
    ids[:10] = (ids[:10] + 1) % 5
    assert zero_shot_agreement(z, ids) == pytest.approx(0.75)
    labels = z.argmax(-1).clone()
    labels[:4] = (labels[:4] + 1) % 5
    assert source_accuracy(z, labels) == pytest.approx(0.9)


def test_directions_reward_confident_diverse_predictions():
    confident = logits(scale=20.0)
    vague = logits(scale=0.1)
    for name in ("bnm", "im"):  # SND also rates uniformly vague predictions as dense (a known weakness)
        fn = VALIDATORS[name].compute
        better = fn(ValidationInputs(confident)) > fn(ValidationInputs(vague))
        assert better == VALIDATORS[name].greater_is_better, name
    assert prediction_entropy(confident) < prediction_entropy(vague)
    assert greater_is_better("eval_ent") is False and greater_is_better("snd") is True
    assert greater_is_better("accuracy") is True and greater_is_better("nonsense") is None


def test_snd_subsamples_a_fixed_seeded_subset():
    z = logits(n=300, seed=1)
    sub = soft_neighborhood_density(z, max_samples=100, seed=5)
    assert sub == soft_neighborhood_density(z, max_samples=100, seed=5)
    assert sub != soft_neighborhood_density(z, max_samples=100, seed=6)
    keep = torch.randperm(300, generator=torch.Generator().manual_seed(5))[:100].sort().values
    assert sub == pytest.approx(soft_neighborhood_density(z[keep], max_samples=None))


def test_dev_prefers_the_model_that_fits_the_source_labels():
    rng = np.random.default_rng(0)
    feats = torch.from_numpy(rng.normal(size=(80, 8)))
    labels = torch.from_numpy(rng.integers(0, 3, 80))
    good = F.one_hot(labels, 3).double() * 6
    bad = F.one_hot((labels + 1) % 3, 3).double() * 6
    target = torch.from_numpy(rng.normal(loc=0.3, size=(60, 8)))
    assert dev_score(feats, good, labels, target) < dev_score(feats, bad, labels, target)


def test_compute_validators_reports_every_available_one():
    z = logits()
    inputs = ValidationInputs(z, target_features=torch.randn(40, 6), zero_shot_ids=z.argmax(-1))
    out = compute_validators(inputs)
    assert set(out) == {"ent", "snd", "bnm", "im", "zs_agreement"}
    assert out["zs_agreement"] == 1.0
    with pytest.raises(ValueError, match="needs .*source_logits"):
        compute_validators(inputs, ["source_accuracy"])
    with pytest.raises(ValueError, match="unknown validator"):
        compute_validators(inputs, ["entropy"])


# ---------------------------------------------------------------------------------------------- bad input
def test_fewer_samples_than_classes_warns_and_stays_defined():
    z = logits(n=3, c=10)
    for name in ("ent", "snd", "bnm", "im"):
        with pytest.warns(ValidatorWarning, match="3 target samples for 10 classes"):
            value = VALIDATORS[name].compute(ValidationInputs(z))
        assert math.isfinite(value)
    with pytest.warns(ValidatorWarning):
        assert math.isfinite(soft_neighborhood_density(logits(n=1, c=4)))


def test_collapsed_predictions_warn_and_stay_defined():
    z = torch.zeros(20, 4)
    z[:, 2] = 5.0
    z += torch.randn(20, 4) * 0.01
    with pytest.warns(ValidatorWarning, match="all 20 target predictions are class 2"):
        value = prediction_entropy(z)
    assert math.isfinite(value)


@pytest.mark.parametrize("name", sorted(VALIDATORS))
def test_non_finite_inputs_score_as_the_worst_never_nan(name):
    z = logits()
    z[3, 1] = float("nan")
    feats = torch.randn(40, 6)
    feats[5, 0] = float("inf")
    inputs = ValidationInputs(
        z,
        target_features=feats,
        zero_shot_ids=torch.zeros(40, dtype=torch.long),
        source_logits=z.clone(),
        source_labels=torch.zeros(40, dtype=torch.long),
        source_features=feats.clone(),
    )
    with pytest.warns(ValidatorWarning, match="NaN/inf"):
        value = compute_validators(inputs, [name])[name]
    assert value == (-math.inf if VALIDATORS[name].greater_is_better else math.inf)


def test_empty_and_too_small_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="empty"):
        prediction_entropy(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="at least 4 held-out source samples"):
        dev_score(torch.randn(3, 4), torch.randn(3, 2), torch.zeros(3, dtype=torch.long), torch.randn(5, 4))
    with pytest.raises(ValueError, match="same target set"):
        zero_shot_agreement(logits(), torch.zeros(7, dtype=torch.long))


def test_no_warning_on_healthy_inputs():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_validators(ValidationInputs(logits(n=100, c=5)))
