"""Keras HDF5 weights -> variables of `jaxseg.models.Unet`, so training can start where the
recipe starts (ImageNet encoder) or continue from a model the recipe trained.

Reads the file with h5py only: no TensorFlow at runtime. Layers are matched by name (the
Flax layers carry the Keras names), shapes are checked layer by layer in network order,
and the first layer that does not fit is named in the error.

    python -m jaxseg.convert --keras_weights=FILE.h5 --backbone=efficientnetb5 --out=DIR
"""
from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import tempfile

import flax.linen as nn
import h5py
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import flags
from flax import traverse_util

from jaxseg import cli, paths, processes
from jaxseg.models import BACKBONES, INPUT_MULTIPLE, EfficientNet, Unet, UnetDecoder, build_model

VARIABLES_DIR = "variables"
META_FILE = "meta.json"
KIND_UNET = "unet"
KIND_ENCODER = "encoder"
# The layer only a whole segmentation_models Unet file has.
_HEAD_LAYER = "final_conv"
# keras.applications' EfficientNet normalises inside the model; its files carry this layer.
_NORMALIZATION_LAYER = "normalization"

StoredWeights = dict[tuple[str, str], np.ndarray]


def read_keras_weights(path: str | os.PathLike) -> StoredWeights:
    """{(layer name, weight name): array} of a tf-keras HDF5 file.

    Handles both `save_weights('x.h5')` (layers at the root) and `save('x.h5')` /
    ModelCheckpoint (under 'model_weights'). A layer group holding a nested model's
    weights is read by the layer names inside its weight names.
    """
    path = paths.path(path)
    if not path.is_file():
        raise cli.MissingInput(f"{path}: no such Keras weights file")
    # h5py reads a bucket's file through the file object, by ranged reads.
    with (path.open("rb") if paths.is_remote(path) else contextlib.nullcontext(
            os.fspath(path))) as source:
        try:
            h5 = h5py.File(source, "r")
        except OSError as error:
            raise cli.InputError(f"{path}: not an HDF5 file ({error})") from None
        with h5:
            return _read_layers(h5, path)


def _read_layers(h5: h5py.File, path: paths.Path) -> StoredWeights:
    root = h5["model_weights"] if "model_weights" in h5 else h5
    if "layer_names" not in root.attrs:
        raise cli.InputError(f"{path}: no 'layer_names' attribute; expected a tf-keras file "
                             "written by save_weights('x.h5') or save('x.h5')")
    weights = {}
    for layer_name in map(_text, root.attrs["layer_names"]):
        group = root[layer_name]
        names = [_text(name) for name in group.attrs.get("weight_names", [])]
        nested = len({name.split("/")[-2] for name in names if "/" in name}) > 1
        for name in names:
            parts = name.split("/")
            layer = parts[-2] if nested else layer_name
            weights[(layer, parts[-1].split(":")[0])] = np.asarray(group[name], np.float32)
    return weights


def _text(value: bytes | str) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _keras_weight_name(layer: str, collection: str, leaf: str) -> str:
    if collection == "batch_stats":
        return {"mean": "moving_mean", "var": "moving_variance"}[leaf]
    if leaf == "scale":
        return "gamma"
    if leaf == "bias":
        return "beta" if layer.endswith("bn") else "bias"
    return "depthwise_kernel" if _is_depthwise(layer) else "kernel"


def _is_depthwise(layer: str) -> bool:
    return layer.endswith("dwconv")


def _keras_shape(layer: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Keras stores a depthwise kernel as (k, k, C, 1), Flax as (k, k, 1, C)."""
    return shape[:2] + (shape[3], shape[2]) if _is_depthwise(layer) else shape


def _to_flax(layer: str, value: np.ndarray) -> np.ndarray:
    return np.swapaxes(value, 2, 3) if _is_depthwise(layer) else value


def _example_input() -> jax.Array:
    return jnp.zeros((1, INPUT_MULTIPLE, INPUT_MULTIPLE, 3), jnp.float32)


def _layers_in_call_order(model: Unet) -> tuple[list[tuple[str, ...]], dict]:
    """Module paths in the order the network first calls them (Keras' layer order, so
    the first misfit reported is the first in the network) and the variables' shapes."""
    order = {}

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            order.setdefault(context.module.path)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        shapes = jax.eval_shape(functools.partial(model.init, train=False),
                                jax.random.key(0), _example_input())
    return list(order), shapes


@functools.partial(jax.jit, static_argnums=0)
def _init_decoder(backbone: str, key: jax.Array) -> dict:
    features = jax.eval_shape(
        lambda x: EfficientNet(backbone).init_with_output(jax.random.key(0), x, train=False)[0],
        _example_input())
    zeros = {name: jnp.zeros(feature.shape, feature.dtype) for name, feature in features.items()}
    return UnetDecoder().init(key, zeros, train=False)


def keras_to_flax(path: str | os.PathLike, backbone: str, seed: int = 0) -> tuple[dict, dict]:
    """{'params', 'batch_stats'} of the Unet of `backbone` (nested dicts of float32 numpy
    arrays) and what the file held ({'kind', 'normalize_input'}), from a
    segmentation_models Unet file, or from an encoder-only ('notop') file of
    qubvel/efficientnet or keras.applications, whose decoder is then freshly initialised
    from `seed`. Raises FileNotFoundError, or ValueError naming the first misfit layer."""
    model = build_model({"backbone": backbone})
    stored = read_keras_weights(path)
    stored_layers = {layer for layer, _ in stored}
    kind = KIND_UNET if _HEAD_LAYER in stored_layers else KIND_ENCODER
    parts = ("encoder", "decoder") if kind == KIND_UNET else ("encoder",)
    order, shapes = _layers_in_call_order(model)
    leaves_by_module = collections.defaultdict(list)
    for collection, tree in shapes.items():
        for key, leaf in traverse_util.flatten_dict(tree).items():
            leaves_by_module[key[:-1]].append((collection, key[-1], tuple(leaf.shape)))
    flat = {collection: {} for collection in shapes}
    for module_path in order:
        if module_path not in leaves_by_module or module_path[0] not in parts:
            continue
        layer = module_path[-1]
        if layer not in stored_layers:
            raise cli.InputError(f"{path}: layer {layer} is missing ({backbone} {kind} weights "
                                 "need it)")
        for collection, leaf, shape in leaves_by_module[module_path]:
            weight = _keras_weight_name(layer, collection, leaf)
            if (layer, weight) not in stored:
                raise cli.InputError(f"{path}: layer {layer} has no {weight} weight")
            value = stored[(layer, weight)]
            if value.shape != _keras_shape(layer, shape):
                raise cli.InputError(f"{path}: layer {layer} {weight} has shape {value.shape}, "
                                     f"{backbone} expects {_keras_shape(layer, shape)}")
            flat[collection][module_path + (leaf,)] = _to_flax(layer, value)
    variables = {collection: traverse_util.unflatten_dict(leaves) for collection, leaves in flat.items()}
    if kind == KIND_ENCODER:
        decoder = jax.tree.map(np.asarray, _init_decoder(backbone, jax.random.key(seed)))
        for collection, tree in decoder.items():
            variables[collection]["decoder"] = tree
    return variables, {"kind": kind, "normalize_input": _NORMALIZATION_LAYER in stored_layers}


def convert_to_dir(keras_weights: str | os.PathLike, backbone: str, out: str | os.PathLike,
                   seed: int = 0) -> dict:
    """Writes `out/variables` (orbax) and `out/meta.json`; returns the meta.

    Everything is written into a hidden sibling directory renamed to `out` at the end, so
    a failure never leaves a partial `out` for training to pick up. A bucket cannot
    rename a directory: there `out` is written in place, `meta.json` last (without it
    `load_converted` refuses the directory), and removed again on failure.
    `normalize_input` in the meta says the file came from a model that normalised its
    input itself (keras.applications): train such weights with
    `config.normalize_input=True`.
    """
    out = paths.absolute(out)
    if out.exists():
        raise cli.InputError(f"{out}: already exists; remove it or choose another --out")
    variables, found = keras_to_flax(keras_weights, backbone, seed)
    meta = {"backbone": backbone, "source": str(paths.absolute(keras_weights)), **found}
    paths.make_parent(out)
    staging = out if paths.is_remote(out) else paths.path(
        tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(staging / VARIABLES_DIR, variables)
            checkpointer.wait_until_finished()
        paths.atomic_write(staging / META_FILE, json.dumps(meta, indent=1) + "\n")
        if staging != out:
            staging.rename(out)
    except BaseException:
        with contextlib.suppress(OSError):
            staging.rmtree()
        raise
    return meta


def read_meta(directory: str | os.PathLike) -> dict:
    """What `convert_to_dir` says about the weights it wrote (backbone, normalisation)."""
    directory = paths.absolute(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise cli.MissingInput(f"{meta_path}: no such file; is {directory} a "
                               "jaxseg.convert output?")
    return paths.read_json(meta_path)


def load_converted(directory: str | os.PathLike) -> tuple[dict, dict]:
    """(variables, meta) written by `convert_to_dir`; variables as numpy arrays."""
    meta = read_meta(directory)
    directory = paths.absolute(directory)
    with ocp.StandardCheckpointer() as checkpointer:
        variables = checkpointer.restore(directory / VARIABLES_DIR)
    return jax.tree.map(np.asarray, variables), meta


def load_init_weights(config: ml_collections.ConfigDict) -> dict | None:
    """The converted weights `init_from` names, checked against the config (by process 0,
    for all) before the run writes anything; None when the model starts from random
    weights."""
    if not config.init_from:
        return None

    def check_meta() -> None:
        meta = read_meta(config.init_from)
        if meta.get("backbone") != config.backbone:
            raise cli.InputError(f"config.init_from: {config.init_from} holds "
                                 f"{meta.get('backbone')} weights, config.backbone is "
                                 f"{config.backbone}")
        if meta.get("normalize_input", False) != config.normalize_input:
            raise cli.InputError(f"config.normalize_input: the weights in {config.init_from} "
                                 f"expect normalize_input={meta.get('normalize_input', False)}")

    processes.decided_by_main(check_meta)
    return load_converted(config.init_from)[0]


def define_flags() -> None:
    flags.DEFINE_string("keras_weights", None,
                        "Keras HDF5 file: a segmentation_models Unet (save_weights/save/"
                        "ModelCheckpoint) or an ImageNet 'notop' EfficientNet file.")
    flags.DEFINE_enum("backbone", "efficientnetb5", list(BACKBONES),
                      "EfficientNet variant the file holds.")
    flags.DEFINE_string("out", None, "Directory to create with the converted variables.")
    flags.DEFINE_integer("seed", 0, "Initialises the decoder when the file holds only an encoder.")
    flags.mark_flags_as_required(["keras_weights", "out"])


def main() -> None:
    meta = convert_to_dir(flags.FLAGS.keras_weights, flags.FLAGS.backbone, flags.FLAGS.out,
                          flags.FLAGS.seed)
    print(f"wrote {flags.FLAGS.out}: {meta['kind']} weights for {meta['backbone']}")


def run() -> None:
    """Where `python -m jaxseg.convert` starts (a console script would call it too)."""
    define_flags()
    cli.run_main(main)


if __name__ == "__main__":
    run()
