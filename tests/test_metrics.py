"""arpg_hf.metrics: FID, Inception score and precision/recall against independent / hand-computed values, the
`evaluate` modules loaded offline, and the FID Inception-v3's input handling and weights resolution."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

import arpg_hf
from arpg_hf.metrics import (
    InceptionV3FeatureExtractor,
    TinyRandomFeatureExtractor,
    evaluate_images,
    extract_features,
    frechet_distance,
    frechet_distance_from_statistics,
    inception_score,
    load_inception_v3,
    manifold_radii,
    precision_recall,
)
from arpg_hf.metrics.inception import INCEPTION_WEIGHTS_ENV, resize_bilinear_tf1


def textbook_fid(a, b):
    """FID as in the FID paper / ADM: scipy's sqrtm of the covariance product."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(sigma_a @ sigma_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.trace(covmean))


def correlated_features(rng, n, d, shift=0.0):
    mixing = rng.normal(size=(d, d))
    return rng.normal(size=(n, d)) @ mixing + shift


# ------------------------------------------------------------------------------------------------------ FID
def test_frechet_distance_matches_the_textbook_formula():
    rng = np.random.default_rng(0)
    a, b = correlated_features(rng, 400, 16), correlated_features(rng, 300, 16, shift=0.5)
    expected = textbook_fid(a, b)
    assert expected > 1
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    as_tensors = torch.from_numpy(a).float(), torch.from_numpy(b).float()  # float32 features, computed in float64
    assert frechet_distance(*as_tensors) == pytest.approx(expected, rel=1e-5)


def test_frechet_distance_of_identical_sets_is_zero():
    a = correlated_features(np.random.default_rng(1), 200, 8)
    assert frechet_distance(a, a.copy()) < 1e-9


def test_frechet_distance_from_statistics_closed_form():
    # |mu_a - mu_b|^2 = 1; tr = 5 + 5; (sigma_a sigma_b)^(1/2) = diag(2, 2) -> 1 + 10 - 8 = 3.
    distance = frechet_distance_from_statistics([0, 0], np.diag([1.0, 4.0]), [1, 0], np.diag([4.0, 1.0]))
    assert distance == pytest.approx(3.0, abs=1e-12)


def test_frechet_distance_stays_finite_with_fewer_samples_than_dimensions():
    rng = np.random.default_rng(2)
    value = frechet_distance(rng.normal(size=(5, 20)), rng.normal(size=(6, 20)))
    assert np.isfinite(value) and value > 0


def test_frechet_distance_rejects_bad_inputs():
    with pytest.raises(ValueError, match="features_a has 3 dimensions per row but features_b has 4"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match=r"must be an \(N, D\) array"):
        frechet_distance(np.zeros(5), np.zeros((5, 1)))
    with pytest.raises(ValueError, match="at least 2 rows"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


# ------------------------------------------------------------------------------------------------------- IS
def test_inception_score_by_hand():
    probabilities = np.array([[0.5, 0.5], [0.9, 0.1]])
    marginal = [0.7, 0.3]
    kl_1 = 0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)
    kl_2 = 0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3)
    assert marginal == pytest.approx(probabilities.mean(0).tolist())
    mean, std = inception_score(np.log(probabilities))
    assert mean == pytest.approx(math.exp((kl_1 + kl_2) / 2), rel=1e-12) and std == 0.0


def test_inception_score_splits():
    confident = np.full((8, 4), -60.0)
    confident[:4, 0] = 0  # split 1: every image the same class -> 1
    confident[np.arange(4, 8), np.arange(4)] = 0  # split 2: four images, four classes -> 4
    mean, std = inception_score(confident, split_size=4)
    assert (mean, std) == (pytest.approx(2.5, rel=1e-9), pytest.approx(1.5, rel=1e-9))
    with pytest.raises(ValueError, match="split_size must be a positive int"):
        inception_score(confident, split_size=0)


# --------------------------------------------------------------------------------------- precision / recall
def test_precision_recall_by_hand():
    real = np.array([[0.0], [1], [2], [3], [4]])
    fake = np.array([[0.5], [4.9], [10], [2.2]])
    # k=3 radii (squared): real 9, 4, 4, 4, 9; fake 90.25, 26.01, 90.25 (for 0.5, 4.9, 10), 60.84 (2.2).
    assert manifold_radii(real, nearest_k=3).tolist() == [9, 4, 4, 4, 9]
    assert manifold_radii(fake, nearest_k=3).numpy() == pytest.approx([90.25, 26.01, 90.25, 60.84])
    # 10 is 36 away from 4 (radius 9): outside; every real point is in some fake ball.
    assert precision_recall(real, fake) == (0.75, 1.0)
    # A far real outlier (k=1 radius 36^2) swallows 10, but no fake ball reaches it.
    far_real = np.concatenate([real, [[40.0]]])
    assert precision_recall(far_real, fake, nearest_k=1) == (1.0, pytest.approx(5 / 6))


def test_precision_counts_points_on_the_radius_as_inside():
    real, fake = np.array([[0.0], [1.0]]), np.array([[2.0], [2.5]])  # k=1 radius 1; 2 is exactly 1 away
    assert precision_recall(real, fake, nearest_k=1)[0] == 0.5
    with pytest.raises(ValueError, match="at least 4 rows"):
        precision_recall(real, fake)  # k = 3 needs 4 samples per set


# ------------------------------------------------------------------------------------------ evaluate modules
@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8), rng.integers(0, 256, (9, 16, 16, 3), dtype=np.uint8)


def test_evaluate_load_of_the_shipped_fid_module_offline(monkeypatch):
    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rng = np.random.default_rng(4)
    a, b = correlated_features(rng, 30, 5), correlated_features(rng, 20, 5, shift=1.0)  # different counts
    fid = evaluate.load(arpg_hf.metrics.metric_module_path("fid"), config_name="features")
    assert fid.compute(predictions=a, references=b)["fid"] == pytest.approx(textbook_fid(a, b), rel=1e-6)


def test_metric_modules_on_images_with_a_tiny_feature_extractor(images):
    generated, reference = images
    extractor = TinyRandomFeatureExtractor()
    ours = extract_features(generated, extractor, batch_size=5)
    theirs = extract_features(reference, extractor, batch_size=5)
    fid = arpg_hf.load_metric("fid").compute(
        predictions=list(generated), references=list(reference), feature_extractor="tiny-random", batch_size=5
    )
    assert fid["fid"] == pytest.approx(frechet_distance(ours["pool"], theirs["pool"]), rel=1e-9)
    score = arpg_hf.load_metric("inception_score").compute(
        predictions=list(generated), feature_extractor=extractor, split_size=5, batch_size=5
    )
    assert score["inception_score"] == pytest.approx(inception_score(ours["logits"], split_size=5)[0], rel=1e-9)
    pr = arpg_hf.load_metric("precision_recall").compute(
        predictions=list(generated), references=list(reference), feature_extractor=extractor, batch_size=5
    )
    assert (pr["precision"], pr["recall"]) == precision_recall(theirs["pool"], ours["pool"])


def test_fid_against_reference_statistics(images, tmp_path):
    generated, reference = images
    extractor = TinyRandomFeatureExtractor()
    ref_pool = extract_features(reference, extractor)["pool"]
    np.savez(tmp_path / "ref.npz", arr_0=reference, mu=ref_pool.mean(0), sigma=np.cov(ref_pool, rowvar=False))
    fid = arpg_hf.load_metric("fid", config_name="statistics").compute(
        predictions=list(generated), reference_statistics=str(tmp_path / "ref.npz"), feature_extractor=extractor
    )["fid"]
    assert fid == pytest.approx(frechet_distance(extract_features(generated, extractor)["pool"], ref_pool), rel=1e-9)


def test_load_metric_rejects_unknown_names_and_configs():
    with pytest.raises(ValueError, match="Unknown metric 'kid'"):
        arpg_hf.load_metric("kid")
    with pytest.raises(ValueError, match="has configurations"):
        arpg_hf.load_metric("inception_score", config_name="statistics")


def test_evaluate_images_gives_the_adm_metric_set(images):
    generated, reference = images
    results = evaluate_images(generated, reference, feature_extractor="tiny-random", nearest_k=3, split_size=6)
    extractor = TinyRandomFeatureExtractor()
    ours, theirs = extract_features(generated, extractor), extract_features(reference, extractor)
    assert results["fid"] == pytest.approx(frechet_distance(ours["pool"], theirs["pool"]), rel=1e-9)
    assert (results["precision"], results["recall"]) == precision_recall(theirs["pool"], ours["pool"])
    assert (results["num_samples"], results["num_reference_images"]) == (12, 9)
    with pytest.raises(ValueError, match="FID needs a reference"):
        evaluate_images(generated, feature_extractor="tiny-random")


# ------------------------------------------------------------------------------------------------ Inception
def test_tf1_bilinear_resize_by_hand():
    image = torch.tensor([[0.0, 1.0], [2.0, 3.0]])[None, None]
    expected = [[0, 0.5, 1, 1], [1, 1.5, 2, 2], [2, 2.5, 3, 3], [2, 2.5, 3, 3]]  # source = destination / 2, clamped
    assert resize_bilinear_tf1(image, 4)[0, 0].tolist() == expected


def test_inception_weights_offline_error_and_local_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=f"process is offline.*{INCEPTION_WEIGHTS_ENV}"):
        load_inception_v3()
    state = InceptionV3FeatureExtractor().state_dict()  # a stand-in file with the standard layout
    torch.save(state, tmp_path / "weights.pth")
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(tmp_path / "weights.pth"))
    model = load_inception_v3()
    assert torch.equal(model.fc.weight, state["fc.weight"]) and not model.training
    features = model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    assert features["pool"].shape == (1, 2048) and features["logits"].shape == (1, 1008)
