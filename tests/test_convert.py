"""Keras weights -> Flax: the converted Unet must compute what the Keras model computes."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import jax
import numpy as np
import pytest

import keras_reference as kr
from jaxseg.convert import convert_to_dir, keras_to_flax, load_converted, read_keras_weights
from jaxseg.models import SKIP_FEATURES, TOP_FEATURE, build_model
from unet_variables import count_weights

FEATURES = list(SKIP_FEATURES) + [TOP_FEATURE]
# Keras' Unet(...).count_params(), pinned so that a change on either side shows.
KERAS_WEIGHT_COUNTS = {"efficientnetb0": 10_115_501, "efficientnetb5": 37_468_673}
PROBABILITY_TOLERANCE = 1e-4


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _logits(backbone: str, depthwise_impl: str, half_precision: bool, variables: dict,
            images: np.ndarray) -> jax.Array:
    model = build_model({"backbone": backbone, "depthwise_impl": depthwise_impl,
                         "half_precision": half_precision})
    return model.apply(variables, images, train=False)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _encoder_features(backbone: str, normalize_input: bool, variables: dict,
                      images: np.ndarray) -> dict:
    _, state = build_model({"backbone": backbone, "normalize_input": normalize_input}).apply(
        variables, images, train=False,
        capture_intermediates=lambda module, method: module.name == "encoder")
    return state["intermediates"]["encoder"]["__call__"][0]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def _calibrated_file(model, shape: tuple[int, int], seed: int, path: Path) -> np.ndarray:
    """Randomises `model` on 3 images of `shape`, saves it to `path`; returns the first 2,
    which the checks run on: with statistics of 3 images, a port normalising with batch
    statistics at inference would not match."""
    images = kr.random_images((3, *shape, 3), seed)
    kr.randomize(model, images, seed)
    model.save_weights(path)
    return images[:2]


@pytest.fixture(scope="module")
def keras_unets() -> dict:
    return {backbone: kr.unet(backbone, seed=0) for backbone in KERAS_WEIGHT_COUNTS}


@pytest.fixture(scope="module")
def unet_files(keras_unets, tmp_path_factory) -> dict:
    """(backbone, height, width) -> (h5 path, images, Keras logits, Keras probabilities)."""
    cases = {}
    for seed, (backbone, height, width) in enumerate([("efficientnetb0", 64, 64),
                                                      ("efficientnetb0", 64, 96),
                                                      ("efficientnetb5", 64, 96)]):
        path = tmp_path_factory.mktemp("unet") / f"{backbone}-{height}x{width}.h5"
        images = _calibrated_file(keras_unets[backbone], (height, width), seed, path)
        logits, probabilities = kr.outputs(keras_unets[backbone], ["final_conv", "sigmoid"], images)
        cases[(backbone, height, width)] = (path, images, logits, probabilities)
    return cases


@pytest.mark.parametrize("backbone", list(KERAS_WEIGHT_COUNTS))
def test_weight_count_matches_keras(keras_unets, unet_files, backbone):
    path = next(case[0] for key, case in unet_files.items() if key[0] == backbone)
    count = count_weights(keras_to_flax(path, backbone)[0])
    assert count == keras_unets[backbone].count_params() == KERAS_WEIGHT_COUNTS[backbone]


@pytest.mark.parametrize("backbone,height,width,depthwise_impl", [
    ("efficientnetb0", 64, 64, "native"), ("efficientnetb0", 64, 64, "shifted"),
    ("efficientnetb0", 64, 96, "native"), ("efficientnetb0", 64, 96, "shifted"),
    ("efficientnetb5", 64, 96, "native"), ("efficientnetb5", 64, 96, "shifted")])
def test_converted_unet_matches_keras(unet_files, backbone, height, width, depthwise_impl):
    path, images, keras_logits, keras_probabilities = unet_files[(backbone, height, width)]
    assert 0.05 < keras_probabilities.std() and keras_logits.std() < 10, "reference saturates"
    logits = np.asarray(_logits(backbone, depthwise_impl, False,
                                keras_to_flax(path, backbone)[0], images))
    assert logits.shape == (2, height, width, 1) and logits.dtype == np.float32
    difference = np.abs(_sigmoid(logits) - keras_probabilities).max()
    print(f"{backbone} {height}x{width} {depthwise_impl}: max |sigmoid diff| {difference:.2e}, "
          f"max |logit diff| {np.abs(logits - keras_logits).max():.2e}")
    assert difference <= PROBABILITY_TOLERANCE
    np.testing.assert_allclose(logits, keras_logits, atol=2e-4, rtol=0)


def test_bfloat16_compute_stays_close_to_float32(unet_files):
    """Loose bounds: bfloat16 keeps 8 significant bits, and a network with random weights
    amplifies rounding more than a trained one."""
    path, images, _, keras_probabilities = unet_files[("efficientnetb0", 64, 96)]
    logits = np.asarray(_logits("efficientnetb0", "auto", True,
                                keras_to_flax(path, "efficientnetb0")[0], images))
    assert logits.dtype == np.float32
    difference = np.abs(_sigmoid(logits) - keras_probabilities).max()
    print(f"bfloat16: max |sigmoid diff| {difference:.3f}")
    assert difference < 0.05
    assert np.corrcoef(np.ravel(_sigmoid(logits)), np.ravel(keras_probabilities))[0, 1] > 0.995


@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")
def test_whole_model_file_converts_like_weights_file(keras_unets, unet_files, tmp_path):
    """save('x.h5') and ModelCheckpoint nest the weights under 'model_weights'."""
    path, *_ = unet_files[("efficientnetb0", 64, 96)]
    model = keras_unets["efficientnetb0"]
    model.load_weights(path)
    model.save(tmp_path / "model.h5")
    with h5py.File(tmp_path / "model.h5") as h5:
        assert "model_weights" in h5
    jax.tree.map(np.testing.assert_array_equal,
                 keras_to_flax(tmp_path / "model.h5", "efficientnetb0")[0],
                 keras_to_flax(path, "efficientnetb0")[0])


@pytest.mark.parametrize("source", ["qubvel", "keras.applications"])
def test_encoder_file_gives_keras_features(source, tmp_path):
    """ImageNet 'notop' files: qubvel's (what segmentation_models loads) and
    keras.applications' (which normalises inside the model: normalize_input=True)."""
    build = kr.qubvel_encoder if source == "qubvel" else kr.applications_encoder
    model = build("efficientnetb0", seed=3)
    images = _calibrated_file(model, (64, 96), 3, tmp_path / "notop.h5")
    expected = kr.outputs(model, FEATURES, images)
    variables, _ = keras_to_flax(tmp_path / "notop.h5", "efficientnetb0", seed=1)
    normalize_input = source == "keras.applications"
    features = _encoder_features("efficientnetb0", normalize_input, variables, images)
    for name, keras_feature in zip(FEATURES, expected):
        scale = np.abs(keras_feature).max()
        np.testing.assert_allclose(features[name], keras_feature, atol=1e-4 * scale, rtol=0,
                                   err_msg=name)
    assert set(variables["params"]) == {"encoder", "decoder"}


def test_encoder_file_decoder_follows_seed(tmp_path):
    model = kr.qubvel_encoder("efficientnetb0", seed=4)
    model.save_weights(tmp_path / "notop.h5")
    first, again, other = (keras_to_flax(tmp_path / "notop.h5", "efficientnetb0", seed=seed)[0]
                           for seed in (1, 1, 2))
    kernel = ("params", "decoder", "decoder_stage0a_conv", "kernel")
    pick = lambda tree: functools.reduce(lambda node, key: node[key], kernel, tree)  # noqa: E731
    np.testing.assert_array_equal(pick(first), pick(again))
    assert not np.array_equal(pick(first), pick(other))
    assert count_weights(first) == KERAS_WEIGHT_COUNTS["efficientnetb0"]


def test_file_of_other_backbone_is_refused(unet_files):
    path, *_ = unet_files[("efficientnetb0", 64, 96)]
    with pytest.raises(ValueError, match=rf"{path.name}: layer stem_conv kernel has shape "
                                         r"\(3, 3, 3, 32\), efficientnetb5 expects \(3, 3, 3, 48\)"):
        keras_to_flax(path, "efficientnetb5")


@pytest.mark.parametrize("layer", ["block3b_se_reduce", "decoder_stage2a_bn"])
def test_missing_layer_is_named(unet_files, tmp_path, layer):
    path, *_ = unet_files[("efficientnetb0", 64, 96)]
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(path.read_bytes())
    with h5py.File(damaged, "r+") as h5:
        del h5[layer]
        names = [str(np.char.decode(name)) if isinstance(name, bytes) else name
                 for name in h5.attrs["layer_names"]]
        h5.attrs["layer_names"] = np.array([name.encode() for name in names if name != layer])
    with pytest.raises(ValueError, match=rf"damaged.h5: layer {layer} is missing"):
        keras_to_flax(damaged, "efficientnetb0")


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.h5"):
        keras_to_flax(tmp_path / "absent.h5", "efficientnetb0")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(ValueError, match="text.h5: not an HDF5 file"):
        read_keras_weights(tmp_path / "text.h5")
    with h5py.File(tmp_path / "plain.h5", "w") as h5:
        h5["x"] = np.zeros(3)
    with pytest.raises(ValueError, match="plain.h5: no 'layer_names'"):
        read_keras_weights(tmp_path / "plain.h5")


def test_converted_directory_round_trips(unet_files, tmp_path):
    path, *_ = unet_files[("efficientnetb0", 64, 96)]
    meta = convert_to_dir(path, "efficientnetb0", tmp_path / "converted")
    variables, loaded_meta = load_converted(tmp_path / "converted")
    assert loaded_meta == meta == {"backbone": "efficientnetb0", "source": str(path),
                                   "kind": "unet", "normalize_input": False}
    jax.tree.map(np.testing.assert_array_equal, variables,
                 keras_to_flax(path, "efficientnetb0")[0])
    with pytest.raises(ValueError, match="converted: already exists"):
        convert_to_dir(path, "efficientnetb0", tmp_path / "converted")
    with pytest.raises(FileNotFoundError, match="meta.json"):
        load_converted(tmp_path)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxseg.convert", *args], capture_output=True,
                          text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)


def test_cli_writes_a_directory_or_one_error_line(unet_files, tmp_path):
    path, *_ = unet_files[("efficientnetb0", 64, 96)]
    done = _run_cli(f"--keras_weights={path}", "--backbone=efficientnetb0",
                    f"--out={tmp_path / 'ok'}")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "ok" / "meta.json").read_text())["kind"] == "unet"
    failed = _run_cli(f"--keras_weights={path}", "--backbone=efficientnetb5",
                      f"--out={tmp_path / 'bad'}")
    assert failed.returncode == 1
    assert failed.stderr.splitlines() == [
        f"error: {path}: layer stem_conv kernel has shape (3, 3, 3, 32), "
        "efficientnetb5 expects (3, 3, 3, 48)"]
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["ok"]
