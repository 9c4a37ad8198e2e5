"""The Flax Unet's layout and behaviour (its outputs are checked against Keras in test_convert)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.models import BACKBONES, Unet, build_model
from jaxseg.models.efficientnet import block_args, round_filters, round_repeats
from unet_variables import count_weights, random_variables

# EfficientNet-B0..B7 stem and top widths and B5's repeats per stage, as the papers'
# reference code (and qubvel's, and keras.applications') compute them.
STEM_FILTERS = [32, 32, 32, 40, 48, 48, 56, 64]
TOP_FILTERS = [1280, 1280, 1408, 1536, 1792, 2048, 2304, 2560]
WIDTHS = [1.0, 1.0, 1.1, 1.2, 1.4, 1.6, 1.8, 2.0]
B5_REPEATS = [3, 5, 5, 7, 7, 9, 3]


def _shapes(model: Unet) -> dict:
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _train_forward(model: Unet, freeze_encoder: bool, variables: dict, images: jax.Array,
                   key: jax.Array) -> tuple[jax.Array, dict]:
    logits, state = model.apply(variables, images, train=True, freeze_encoder=freeze_encoder,
                                rngs={"dropout": key}, mutable=["batch_stats"])
    return logits, state["batch_stats"]


@pytest.fixture(scope="module")
def b0_setup() -> tuple[dict, np.ndarray]:
    images = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    return random_variables(Unet("efficientnetb0"), seed=0), images


def test_weight_counts_equal_keras_count_params():
    assert count_weights(_shapes(Unet("efficientnetb0"))) == 10_115_501
    assert count_weights(_shapes(Unet("efficientnetb5"))) == 37_468_673


def test_scaling_follows_the_reference_tables():
    assert [round_filters(32, width) for width in WIDTHS] == STEM_FILTERS
    assert [round_filters(1280, width) for width in WIDTHS] == TOP_FILTERS
    assert [round_repeats(repeats, 2.2) for repeats in (1, 2, 2, 3, 3, 4, 1)] == B5_REPEATS
    blocks = block_args("efficientnetb5", drop_connect_rate=0.2)
    assert [sum(block.name[5] == str(stage) for block in blocks)
            for stage in range(1, 8)] == B5_REPEATS
    assert blocks[0].drop_rate == 0 and blocks[-1].drop_rate == pytest.approx(0.2 * 38 / 39)
    assert [block.name for block in blocks[:4]] == ["block1a", "block1b", "block1c", "block2a"]


def test_b5_unet_layout_is_the_recipes():
    params = _shapes(Unet("efficientnetb5"))["params"]
    assert set(params) == {"encoder", "decoder"}
    assert params["encoder"]["stem_conv"]["kernel"].shape == (3, 3, 3, 48)
    assert params["encoder"]["block2a_dwconv"]["kernel"].shape == (3, 3, 1, 144)
    assert params["encoder"]["top_conv"]["kernel"].shape == (1, 1, 512, 2048)
    # Upsampled channels plus skips 1056/384/240/144, then no skip.
    assert [params["decoder"][f"decoder_stage{stage}a_conv"]["kernel"].shape[2]
            for stage in range(5)] == [3104, 640, 368, 208, 32]
    assert params["decoder"]["final_conv"]["kernel"].shape == (3, 3, 16, 1)
    assert params["decoder"]["final_conv"]["bias"].shape == (1,)


def test_bad_arguments_are_refused_with_their_value():
    with pytest.raises(ValueError, match="'efficientnetb9'.*efficientnetb0, efficientnetb1"):
        Unet("efficientnetb9")
    with pytest.raises(ValueError, match="'fast'"):
        build_model({"backbone": "efficientnetb0", "depthwise_impl": "fast"})
    with pytest.raises(ValueError, match=r"\(64, 32\)"):
        Unet("efficientnetb0", decoder_filters=(64, 32))
    assert BACKBONES == tuple(f"efficientnetb{index}" for index in range(8))


def test_input_size_not_multiple_of_32_is_refused():
    with pytest.raises(ValueError, match="100x96"):
        Unet("efficientnetb0").init(jax.random.key(0), jnp.zeros((1, 100, 96, 3)), train=False)


def test_frozen_encoder_keeps_its_statistics(b0_setup):
    variables, images = b0_setup
    model = build_model({"backbone": "efficientnetb0"})
    before = variables["batch_stats"]
    for freeze_encoder in (False, True):
        _, after = _train_forward(model, freeze_encoder, variables, images, jax.random.key(0))
        encoder_kept = jax.tree.leaves(jax.tree.map(np.array_equal, before["encoder"],
                                                    after["encoder"]))
        decoder_kept = jax.tree.leaves(jax.tree.map(np.array_equal, before["decoder"],
                                                    after["decoder"]))
        assert all(encoder_kept) == freeze_encoder
        assert not any(decoder_kept)


@pytest.mark.parametrize("freeze_encoder", [False, True])
def test_drop_connect_draws_from_the_dropout_stream(b0_setup, freeze_encoder):
    """Keras keeps dropout active in a frozen (non-trainable) encoder, so does the port
    (its effect is small here: default running statistics leave the encoder unnormalised)."""
    variables, images = b0_setup
    model = build_model({"backbone": "efficientnetb0"})
    first, again, other = (_train_forward(model, freeze_encoder, variables, images,
                                          jax.random.key(seed))[0] for seed in (1, 1, 2))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_bfloat16_compute_keeps_float32_parameters():
    """Compute precision is checked against float32 on converted weights in test_convert."""
    half_model = build_model({"backbone": "efficientnetb0", "half_precision": True})
    assert {leaf.dtype for leaf in jax.tree.leaves(_shapes(half_model))} == {np.dtype(np.float32)}
