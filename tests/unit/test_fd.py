"""Fréchet distance, bootstrap, FD-inf, paired KL and IS: closed-form and synthetic cases."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.linalg

from adm_export.errors import InvalidInputError
from adm_export.eval import fd


def _rng(seed=0):
    return np.random.default_rng(seed)


# ------------------------------------------------------------------------------------------
# FD
# ------------------------------------------------------------------------------------------


def test_gaussian_stats_shapes_and_dtype():
    x = _rng().normal(size=(50, 6)).astype(np.float32)
    mu, sigma = fd.gaussian_stats(x)
    assert mu.shape == (6,) and sigma.shape == (6, 6)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False))


def test_gaussian_stats_needs_two_rows():
    with pytest.raises(InvalidInputError, match="--num-clips"):
        fd.gaussian_stats(np.ones((1, 4)))


def test_identical_sets_give_zero():
    x = _rng().normal(size=(40, 10))
    assert fd.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)


def test_identical_sets_give_zero_when_rank_deficient():
    x = _rng().normal(size=(8, 300))
    assert fd.frechet_distance(x, x.copy()) == pytest.approx(0.0, abs=1e-7)


def test_diagonal_gaussians_match_closed_form():
    rng = _rng(1)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 4.0, size=5), rng.uniform(0.1, 4.0, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = fd.frechet_distance_from_stats(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-10)


def test_commuting_gaussians_match_closed_form():
    """Rotated diagonal covariances (same eigenvectors): the closed form still holds."""
    rng = _rng(2)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    a, b = rng.uniform(0.1, 3.0, size=6), rng.uniform(0.1, 3.0, size=6)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu = np.zeros(6)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fd.frechet_distance_from_stats(mu, s1, mu, s2) == pytest.approx(expected, rel=1e-8)


def test_one_dimensional_case():
    got = fd.frechet_distance_from_stats(np.array([1.0]), np.array([[4.0]]),
                                         np.array([-2.0]), np.array([[9.0]]))
    assert got == pytest.approx(3.0**2 + (2.0 - 3.0) ** 2)


def test_mean_shift_gives_squared_norm():
    x = _rng(3).normal(size=(200, 8))
    delta = np.linspace(-1.0, 1.0, 8)
    assert fd.frechet_distance(x, x + delta) == pytest.approx(delta @ delta, rel=1e-8)


def test_mean_shift_rank_deficient_uses_exact_projection():
    """8 clips in 512 dimensions: the subspace projection keeps FD exact."""
    x = _rng(4).normal(size=(8, 512))
    delta = _rng(5).normal(size=512) * 0.1
    assert fd.frechet_distance(x, x + delta) == pytest.approx(delta @ delta, rel=1e-6)


def test_projection_matches_full_dimension_computation():
    rng = _rng(6)
    x, y = rng.normal(size=(10, 60)), rng.normal(size=(12, 60)) * 1.5 + 0.2
    mu1, s1 = fd.gaussian_stats(x)
    mu2, s2 = fd.gaussian_stats(y)
    full = fd.frechet_distance_from_stats(mu1, s1, mu2, s2)
    assert fd.frechet_distance(x, y) == pytest.approx(full, rel=1e-6)


def test_shape_mismatch_is_a_user_error():
    with pytest.raises(InvalidInputError, match="--embedder"):
        fd.frechet_distance(np.ones((4, 3)), np.ones((4, 5)))
    with pytest.raises(InvalidInputError):
        fd.frechet_distance(np.ones(4), np.ones(4))
    with pytest.raises(InvalidInputError, match="NaN"):
        fd.frechet_distance(np.full((4, 3), np.nan), np.ones((4, 3)))


# ------------------------------------------------------------------------------------------
# sqrtm cross-check
# ------------------------------------------------------------------------------------------


def test_wrong_sqrtm_is_caught(monkeypatch):
    real_sqrtm = scipy.linalg.sqrtm
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda a, *args, **kw: 1.2 * real_sqrtm(a))
    x, y = _rng(7).normal(size=(50, 4)), _rng(8).normal(size=(50, 4)) + 1.0
    with pytest.raises(fd.FDNumericalError, match="cross-check failed") as info:
        fd.frechet_distance(x, y)
    assert "sqrtm" in str(info.value) and "eigendecomposition" in str(info.value)
    assert isinstance(info.value, RuntimeError)


def test_complex_sqrtm_is_caught(monkeypatch):
    real_sqrtm = scipy.linalg.sqrtm
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda a, *args, **kw: real_sqrtm(a) + 0.5j)
    x = _rng(9).normal(size=(30, 3))
    with pytest.raises(fd.FDNumericalError, match="imaginary"):
        fd.frechet_distance(x, x + 1.0)


def test_tiny_imaginary_part_is_dropped(monkeypatch):
    real_sqrtm = scipy.linalg.sqrtm
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda a, *args, **kw: real_sqrtm(a) + 1e-9j)
    x = _rng(10).normal(size=(30, 3))
    assert fd.frechet_distance(x, x + 1.0) == pytest.approx(3.0, rel=1e-8)


def test_singular_product_falls_back_to_offset(monkeypatch, caplog):
    """First sqrtm call non-finite (as for a singular product), the offset retry succeeds."""
    real_sqrtm = scipy.linalg.sqrtm
    calls = []

    def flaky(a, *args, **kw):
        calls.append(a)
        out = real_sqrtm(a)
        return np.full_like(out, np.nan) if len(calls) == 1 else out

    monkeypatch.setattr(scipy.linalg, "sqrtm", flaky)
    x = _rng(11).normal(size=(40, 5))
    with caplog.at_level(logging.WARNING, logger="adm_export.eval.fd"):
        got = fd.frechet_distance(x, x + 0.5)
    assert len(calls) == 2
    assert got == pytest.approx(5 * 0.25, rel=1e-6)
    assert "adding" in caplog.text


def test_always_nonfinite_sqrtm_raises(monkeypatch):
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda a, *args, **kw: np.full(a.shape, np.inf))
    x = _rng(12).normal(size=(20, 3))
    with pytest.raises(fd.FDNumericalError, match="non-finite"):
        fd.frechet_distance(x, x + 1.0)


# ------------------------------------------------------------------------------------------
# Bootstrap and FD-inf
# ------------------------------------------------------------------------------------------


def test_bootstrap_interval_contains_estimate():
    rng = _rng(13)
    x, y = rng.normal(size=(300, 4)), rng.normal(size=(300, 4)) + 0.5
    res = fd.fd_bootstrap(x, y, n_boot=100, seed=0)
    assert set(res) >= {"fd", "ci_low", "ci_high", "n_x", "n_y", "dim", "warning"}
    assert res["ci_low"] <= res["fd"] <= res["ci_high"]
    assert res["fd"] == pytest.approx(fd.frechet_distance(x, y))
    assert (res["n_x"], res["n_y"], res["dim"]) == (300, 300, 4)
    assert res["warning"] is None
    assert fd.fd_bootstrap(x, y, n_boot=100, seed=0) == res  # deterministic


def test_bootstrap_warns_when_fewer_clips_than_dims(caplog):
    rng = _rng(14)
    x, y = rng.normal(size=(8, 64)), rng.normal(size=(8, 64))
    with caplog.at_level(logging.WARNING, logger="adm_export.eval.fd"):
        res = fd.fd_bootstrap(x, y, n_boot=20)
    assert res["warning"] and "rank-deficient" in res["warning"]
    assert "rank-deficient" in caplog.text


def test_bootstrap_rejects_bad_arguments():
    x = _rng(15).normal(size=(10, 2))
    with pytest.raises(InvalidInputError):
        fd.fd_bootstrap(x, x, n_boot=0)
    with pytest.raises(InvalidInputError):
        fd.fd_bootstrap(x, x, ci=1.5)


def test_fd_infinity_recovers_intercept():
    rng = _rng(16)
    d = 4
    shift = np.full(d, 0.5)  # true FD = ||shift||^2 = 1.0 (same covariance)
    x, y = rng.normal(size=(4000, d)), rng.normal(size=(4000, d)) + shift
    res = fd.fd_infinity(x, y, ns=[100, 200, 400, 800, 1600], seed=0, n_trials=40)
    assert res["fd_inf"] == pytest.approx(1.0, abs=0.08)
    assert res["slope"] > 0  # small-N FD is biased upward
    assert [p["n"] for p in res["points"]] == [100, 200, 400, 800, 1600]
    # The extrapolation removes most of the small-N bias.
    assert abs(res["fd_inf"] - 1.0) < abs(res["points"][0]["fd"] - 1.0)
    assert res["warning"] is None


def test_fd_infinity_default_sizes_and_validation():
    rng = _rng(17)
    x, y = rng.normal(size=(8, 3)), rng.normal(size=(10, 3))
    res = fd.fd_infinity(x, y)
    ns = [p["n"] for p in res["points"]]
    assert len(ns) >= 2 and max(ns) == 8 and min(ns) >= 2
    with pytest.raises(InvalidInputError, match="--num-clips"):
        fd.fd_infinity(x, y, ns=[4, 20])
    with pytest.raises(InvalidInputError):
        fd.fd_infinity(x, y, ns=[5])


# ------------------------------------------------------------------------------------------
# KL and IS
# ------------------------------------------------------------------------------------------


def test_kl_identical_logits_is_zero():
    logits = _rng(18).normal(size=(6, 527)) * 3
    assert fd.kl_paired(logits, logits, eps=0.0) == pytest.approx(0.0, abs=1e-12)
    # audioldm_eval's +1e-6 makes it -C*eps at most: still ~0.
    assert abs(fd.kl_paired(logits, logits)) <= 527 * 1e-6
    kl_sig = fd.kl_paired(logits, logits, activation="sigmoid", eps=0.0)
    assert kl_sig == pytest.approx(0.0, abs=1e-12)


def test_kl_different_logits_is_positive_and_directed():
    a = np.log(np.array([[0.9, 0.1]]))
    b = np.log(np.array([[0.5, 0.5]]))
    expected = 0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1)  # KL(p_b || p_a)
    assert fd.kl_paired(a, b, eps=0.0) == pytest.approx(expected)
    rng = _rng(19)
    la, lb = rng.normal(size=(5, 527)) * 2, rng.normal(size=(5, 527)) * 2
    assert fd.kl_paired(la, lb) > 0.1
    assert fd.kl_paired(la, lb, activation="sigmoid") > 0.1


def test_kl_rejects_mismatched_shapes():
    with pytest.raises(InvalidInputError, match="equal shape"):
        fd.kl_paired(np.zeros((4, 527)), np.zeros((3, 527)))
    with pytest.raises(InvalidInputError):
        fd.kl_paired(np.zeros((4, 527)), np.zeros((4, 527)), activation="relu")


def test_inception_score_bounds():
    same = np.tile(_rng(20).normal(size=(1, 10)), (8, 1))
    assert fd.inception_score(same) == pytest.approx(1.0)
    confident = np.eye(10) * 50.0  # each clip sure of a different class
    assert fd.inception_score(confident) == pytest.approx(10.0, rel=1e-6)
    assert fd.inception_score(confident, splits=2) == pytest.approx(5.0, rel=1e-6)
    with pytest.raises(InvalidInputError):
        fd.inception_score(confident, splits=11)
