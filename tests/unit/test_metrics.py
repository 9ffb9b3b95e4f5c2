"""FID/IS/KID against closed forms and against torch-fidelity on the same features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.evaluation.features import (
    build_feature_extractor,
    extract_features,
    register_feature_extractor,
)
from trainer.evaluation.metrics import (
    FeatureMoments,
    compute_metrics,
    feature_statistics,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    metric_rng_seed,
)
from trainer.evaluation.reference import (
    ReferenceStats,
    image_hash,
    reference_from_batches,
    reference_from_images,
)


def _spd(d: int, seed: int) -> np.ndarray:
    """A random symmetric positive-definite (d, d) matrix."""
    a = np.random.default_rng(seed).standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root via eigh (independent of the library's eigvals route)."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


# --------------------------------------------------------------------------- Frechet distance


def test_fid_identical_gaussians_is_zero() -> None:
    mu, sigma = np.random.default_rng(0).standard_normal(8), _spd(8, 1)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_fid_shifted_means_is_squared_distance() -> None:
    rng = np.random.default_rng(2)
    mu1, mu2, sigma = rng.standard_normal(6), rng.standard_normal(6), _spd(6, 3)
    expected = float(np.sum((mu1 - mu2) ** 2))
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(expected, rel=1e-8)


def test_fid_diagonal_covariances_closed_form() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.uniform(0.1, 3.0, 5), rng.uniform(0.1, 3.0, 5)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    # For commuting (diagonal) covariances: Tr(A + B - 2 sqrt(AB)) = sum (sqrt a - sqrt b)^2.
    expected = float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-8)


def test_fid_full_covariances_match_symmetric_sqrt_form() -> None:
    # Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2): an independent route for non-commuting S1, S2.
    s1, s2 = _spd(7, 5), _spd(7, 6)
    r = _sqrtm_psd(s1)
    expected = float(np.trace(s1) + np.trace(s2) - 2 * np.trace(_sqrtm_psd(r @ s2 @ r)))
    assert frechet_distance(np.zeros(7), s1, np.zeros(7), s2) == pytest.approx(expected, rel=1e-7)
    assert expected > 0.01  # the case is not trivially zero


def test_fid_scalar_gaussians() -> None:
    # 1-d: (m1 - m2)^2 + (s1 - s2)^2 with s the standard deviations.
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]])) == (
        pytest.approx(4.0 + 1.0)
    )


def test_streaming_moments_match_numpy_and_library() -> None:
    from torch_fidelity.metric_fid import (
        KEY_METRIC_FID,
        fid_features_to_statistics,
        fid_statistics_to_metric,
    )

    g = torch.Generator().manual_seed(0)
    f1 = torch.randn(300, 12, generator=g, dtype=torch.float64) * 2 + 1
    f2 = torch.randn(250, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    m = FeatureMoments(12)
    for chunk in f1.split(37):  # uneven batches, as the loader gives them
        m.update(chunk)
    mu, cov = m.mean_cov()
    np.testing.assert_allclose(mu, f1.numpy().mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(f1.numpy(), rowvar=False), rtol=1e-9, atol=1e-10)

    ours = frechet_distance(*feature_statistics(f1), *feature_statistics(f2))
    lib = fid_statistics_to_metric(fid_features_to_statistics(f1), fid_features_to_statistics(f2), False)
    assert ours == pytest.approx(lib[KEY_METRIC_FID], rel=1e-8)
    assert ours > 1.0


def test_compute_metrics_fid_against_reference_stats() -> None:
    g = torch.Generator().manual_seed(1)
    real = torch.randn(400, 6, generator=g)
    ref = ReferenceStats(*feature_statistics(real), num_images=400, features=real.numpy())
    same = compute_metrics({"features": real}, ref, ("fid", "kid"))
    assert same["fid"] == pytest.approx(0.0, abs=1e-6)
    shifted = compute_metrics({"features": real + 0.5}, ref, ("fid", "kid"))
    assert shifted["fid"] == pytest.approx(6 * 0.25, rel=1e-6)  # mean shift only: ||0.5 * 1||^2
    assert shifted["kid"] > same["kid"] + 1e-3


# --------------------------------------------------------------------------- IS and KID


def test_inception_score_closed_forms() -> None:
    # Uniform predictions carry no information: IS = 1.
    assert inception_score(torch.zeros(100, 10), splits=2)[0] == pytest.approx(1.0)
    # Confident, evenly spread predictions over C classes: IS = C.
    logits = torch.full((200, 10), -1e4)
    logits[torch.arange(200), torch.arange(200) % 10] = 0.0
    assert inception_score(logits, splits=1)[0] == pytest.approx(10.0, rel=1e-6)


def test_kid_matches_library_and_is_zero_for_same_distribution() -> None:
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric

    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(120, 8, generator=g), torch.randn(120, 8, generator=g) + 1.0
    mean, _ = kernel_inception_distance(a, b, subsets=5, subset_size=50)
    lib = kid_features_to_metric(
        a.double(), b.double(), kid_subsets=5, kid_subset_size=50, kid_kernel="poly",
        kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1,
        rng_seed=metric_rng_seed, verbose=False,
    )
    assert mean == pytest.approx(lib[KEY_METRIC_KID_MEAN], rel=1e-9)
    same, _ = kernel_inception_distance(a, torch.randn(120, 8, generator=g), subsets=5, subset_size=50)
    assert abs(same) < mean / 5


# --------------------------------------------------------------------------- extractors, reference


class _CountingExtractor:
    """A tiny fixed conv 'feature extractor' that counts the images it sees."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(8, 3, 3, 3, generator=g)
        self.seen = 0

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.seen += x.shape[0]
        h = torch.nn.functional.conv2d(x.float() / 127.5 - 1, self.w).relu()  # (B, 8, H-2, W-2)
        return {"features": h.mean((2, 3)), "logits": h.amax((2, 3))}


def test_registry_and_import_path() -> None:
    register_feature_extractor("counting-test", lambda weights, device: _CountingExtractor())
    assert isinstance(build_feature_extractor("counting-test"), _CountingExtractor)
    ext = build_feature_extractor("tests.unit.test_metrics:_factory")
    assert isinstance(ext, _CountingExtractor)
    with pytest.raises(ValueError, match="unknown feature extractor"):
        build_feature_extractor("no-such-extractor")


def _factory(weights: str, device: torch.device) -> _CountingExtractor:
    return _CountingExtractor()


def test_extract_features_rejects_float_and_runs_without_autocast() -> None:
    ext = _CountingExtractor()
    with pytest.raises(TypeError):
        extract_features(ext, torch.zeros(1, 3, 8, 8), "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = extract_features(ext, torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "cpu")
    assert out["features"].dtype == torch.float32 and out["features"].shape == (2, 8)


def test_reference_from_images_and_cache_roundtrip(tmp_path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (37, 10, 10, 3), dtype=np.uint8)  # ADM layout (N, H, W, 3)
    ext = _CountingExtractor()
    ref = reference_from_images(images, ext, "cpu", batch_size=8, meta={"extractor": "counting"})
    assert ext.seen == 37 and ref.num_images == 37 and ref.features.shape == (37, 8)
    direct = ext(torch.from_numpy(images).permute(0, 3, 1, 2))["features"]
    mu, sigma = feature_statistics(direct)
    np.testing.assert_allclose(ref.mu, mu, rtol=1e-6)
    np.testing.assert_allclose(ref.sigma, sigma, rtol=1e-5, atol=1e-9)

    path = tmp_path / "ref.npz"
    ref.save(path)
    back = ReferenceStats.load(path)
    np.testing.assert_array_equal(back.mu, ref.mu)
    np.testing.assert_array_equal(back.sigma, ref.sigma)
    assert back.num_images == 37 and back.meta == {"extractor": "counting"}
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_reference_load_accepts_adm_stats(tmp_path) -> None:
    # ADM's VIRTUAL_*_reference batches store mu/sigma (plus spatial stats) and no meta.
    path = tmp_path / "adm.npz"
    np.savez(path, mu=np.ones(4, np.float32), sigma=np.eye(4, dtype=np.float32), mu_s=np.zeros(2))
    ref = ReferenceStats.load(path)
    assert ref.mu.dtype == np.float64 and ref.num_images == -1 and ref.features is None
    assert compute_metrics({"features": torch.randn(50, 4)}, ref, ("fid",))["fid"] > 0


def test_inception_offline_weights_file(tmp_path, monkeypatch) -> None:
    """The offline option: a weights path loads without touching the network."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download Inception weights")

    # Make a weights file with the right keys from a randomly initialised network.
    monkeypatch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
    monkeypatch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
    net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "inception.pth"
    torch.save(net.state_dict(), weights)
    monkeypatch.undo()

    monkeypatch.setattr(fe, "load_state_dict_from_url", no_network)
    ext = build_feature_extractor("inception-v3-compat", str(weights), "cpu")
    out = extract_features(ext, torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8), "cpu")
    assert out["features"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    assert torch.isfinite(out["features"]).all()
    with pytest.raises(FileNotFoundError):
        build_feature_extractor("inception-v3-compat", str(tmp_path / "missing.pth"), "cpu")


def test_kid_reference_subset_does_not_depend_on_read_order() -> None:
    # What different world sizes do: the same images, read in another order and batching.
    imgs = torch.from_numpy(np.random.default_rng(5).integers(0, 256, (30, 3, 8, 8), dtype=np.uint8))
    ext = _CountingExtractor()
    a = reference_from_batches(imgs.split(7), ext, "cpu", 30, kid_features=6)
    b = reference_from_batches(imgs.flip(0).split(4), ext, "cpu", 30, kid_features=6)
    assert a.features.shape == (6, 8)
    np.testing.assert_allclose(a.features, b.features, rtol=1e-6)
    np.testing.assert_allclose(a.mu, b.mu, rtol=1e-6)
    # The kept subset is the 6 smallest image hashes, in hash order.
    order = torch.argsort(image_hash(imgs))[:6]
    np.testing.assert_allclose(a.features, ext(imgs[order])["features"].numpy(), rtol=1e-6)
