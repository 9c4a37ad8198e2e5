"""The recipe's TFRecord tile format, shared by `prepare` (writer) and `data` (reader).

One file per slide named `<id>-<count>.tfrec`; each example holds `image`, the raw
bytes of a uint8 (D, D, 3) array, and `mask`, the raw bytes of a bool (D, D) array
(Kaggle dataset "hubmap-of-2048512-images-with-test"). Keeping the layout byte for
byte lets users train on TFRecords they already made for the Keras recipe.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np

from jaxseg import paths
from jaxseg.tensorflow_quiet import tf

RECORD_SUFFIX = ".tfrec"
_COUNT_IN_NAME = re.compile(r"-([0-9]+)\.tfrec$")
_RECORD_NAME = re.compile(r"(?P<slide>.+)-[0-9]+" + re.escape(RECORD_SUFFIX))


def serialize_example(image: np.ndarray, mask: np.ndarray) -> bytes:
    """Encodes one tile; the mask is stored as bool bytes whatever its input dtype."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (D, D, 3), got {image.dtype} {image.shape}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {image.shape[:2]}")
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image.tobytes()])),
        "mask": tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[(mask > 0).astype(np.bool_).tobytes()])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def record_name(slide_id: str, count: int) -> str:
    return f"{slide_id}-{count}{RECORD_SUFFIX}"


def slide_of_record(name: str) -> str | None:
    """The slide id of a `<id>-<count>.tfrec` file name; None for any other name."""
    match = _RECORD_NAME.fullmatch(name)
    return match["slide"] if match else None


def count_from_name(path: str | os.PathLike) -> int | None:
    """The example count the recipe encodes in the file name, or None when absent."""
    match = _COUNT_IN_NAME.search(os.fspath(path))
    return int(match.group(1)) if match else None


def write_records(out_dir: str | os.PathLike, slide_id: str,
                  tiles: Iterable[tuple[np.ndarray, np.ndarray]]) -> Path | None:
    """Writes `<id>-<count>.tfrec` whole or not at all (`paths.staged_file`: an
    interrupted run never leaves a partial record file that training would pick up);
    None, and no file, when there are no tiles (training rejects an empty record file).
    The count, and so the name, is known only once the tiles are written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    count = 0
    with paths.staged_file(out_dir / f"{slide_id}{RECORD_SUFFIX}") as staged:
        with tf.io.TFRecordWriter(staged.path) as writer:
            for image, mask in tiles:
                writer.write(serialize_example(image, mask))
                count += 1
        final_path = out_dir / record_name(slide_id, count) if count else None
        staged.destination = paths.path(final_path) if final_path else None
    return final_path
