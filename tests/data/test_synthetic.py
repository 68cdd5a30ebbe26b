"""Synthetic(alpha, beta): shapes, sizes, labels from each device's own model, and the config hook."""

from pathlib import Path

import numpy as np

from fl_components.config import config_from_dict
from fl_components.data.site_files import load_site
from fl_components.data.synthetic import N_CLASSES, N_FEATURES, synthetic_devices
from fl_components.federation import dataset_info, materialize_sites


def test_devices_follow_the_papers_recipe() -> None:
    devices = synthetic_devices(n_devices=30, alpha=1.0, beta=1.0, rng=np.random.default_rng(3))
    assert len(devices) == 30
    sizes = np.array([len(d.data) for d in devices])
    assert sizes.min() >= 50  # lognormal(4, 2) + 50
    for device in devices:
        x, y = device.data.features, device.data.labels
        assert x.shape[1] == N_FEATURES and x.dtype == np.float32
        assert y.min() >= 0 and y.max() < N_CLASSES
        # y = argmax softmax(W_k x + b_k), the device's own model
        np.testing.assert_array_equal(y, np.argmax(x @ device.weights + device.bias, axis=1))


def test_same_generator_seed_same_devices_and_alpha_zero_shares_the_model_mean() -> None:
    a = synthetic_devices(n_devices=3, alpha=0.5, beta=0.5, rng=np.random.default_rng(1))
    b = synthetic_devices(n_devices=3, alpha=0.5, beta=0.5, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(a[2].data.features, b[2].data.features)
    # alpha = 0, beta = 0: u_k = 0, B_k = 0, so W_k ~ N(0, 1) around the same mean
    flat = synthetic_devices(n_devices=30, alpha=0.0, beta=0.0, rng=np.random.default_rng(2))
    means = np.array([d.weights.mean() for d in flat])
    assert abs(means.mean()) < 0.1 and means.std() < 0.2


def test_feature_covariance_is_diagonal_j_to_the_minus_1_2() -> None:
    # seed 108 draws a large device (19001 examples), so the sample variance is tight
    [device] = synthetic_devices(n_devices=1, alpha=0.0, beta=0.0, rng=np.random.default_rng(108))
    x = device.data.features
    assert len(x) > 10_000
    np.testing.assert_allclose(x.var(axis=0)[:3], [1.0, 2**-1.2, 3**-1.2], rtol=0.05)
    capped = synthetic_devices(
        n_devices=1, alpha=0.0, beta=0.0, rng=np.random.default_rng(108), max_examples=500
    )
    assert len(capped[0].data) == 500


def test_config_option_makes_one_site_per_device(tmp_path: Path) -> None:
    config = config_from_dict(
        {
            "sites": [{"name": f"device-{i}"} for i in range(4)],
            "data": {
                "dataset": "synthetic",
                "synthetic_alpha": 0.5,
                "synthetic_beta": 0.5,
                "sites_dir": str(tmp_path),
            },
        }
    )
    info = dataset_info(config)
    assert (info.n_features, info.n_classes) == (60, 10)
    folders = materialize_sites(config)
    site = load_site(folders[0])
    assert site.train.features.shape[1] == 60 and len(site.test) >= 1
    assert (tmp_path / config.name / "_central" / "test.npz").is_file()
