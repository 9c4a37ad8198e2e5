"""tf.data input pipeline: record files -> folds -> per-host numpy batches for JAX.

TensorFlow only feeds the pipeline; JAX owns the accelerators. Errors inside tf.data
surface as opaque runtime errors at iteration time, so every record carries the name of
its file through the pipeline and failures are re-raised here as one-line ValueErrors
that name the file.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import struct
from typing import Iterator, Mapping, Sequence

import ml_collections
import numpy as np

import jax

from jaxseg import cli, parallel, paths
from jaxseg.augment import augment_fn
from jaxseg.records import RECORD_SUFFIX, count_from_name, record_name
from jaxseg.tensorflow_quiet import tf


def _hide_gpus_from_tensorflow() -> None:
    """Left alone, TensorFlow would reserve all GPU memory that JAX needs."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        pass  # TF initialised its devices before this import; nothing can be changed now.


_hide_gpus_from_tensorflow()

Batch = dict[str, np.ndarray]

_FEATURES = {
    # An empty default turns a missing feature into a length error that names the file.
    "image": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "mask": tf.io.FixedLenFeature([], tf.string, default_value=""),
}
_BAD_RECORD_TAG = "jaxseg-bad-record"
_BAD_RECORD_MESSAGE = re.compile(
    rf"\[{_BAD_RECORD_TAG}\] \[(?P<path>.+?)\] \[(?P<feature>image|mask)\] \[(?P<length>\d+)\]")
_TF_MESSAGE_NOISE = re.compile(r"\{\{function_node [^}]*\}\}|\[Op:[^\]]*\].*")
# TensorFlow may quote a whole record (megabytes) in its message.
_MAX_DETAIL = 200
# A TFRecord frames each record with its length (8 bytes) and two 4-byte checksums.
_RECORD_LENGTH = struct.Struct("<Q")
_RECORD_FRAMING_BYTES = _RECORD_LENGTH.size + 8
# The recipe has one file per slide and 16 slides: reading them all at once puts tiles
# of many slides in every shuffle buffer.
_MAX_FILES_READ_AT_ONCE = 16


def list_record_files(data_dir: str | os.PathLike) -> list[str]:
    """Sorted, so that folds depend only on the file names; gs:// directories work too."""
    directory = os.fspath(data_dir)
    if not tf.io.gfile.isdir(directory):
        raise cli.MissingInput(f"data directory {directory} does not exist")
    files = sorted(tf.io.gfile.glob(os.path.join(directory, f"*{RECORD_SUFFIX}")))
    if not files:
        raise cli.MissingInput(f"no *{RECORD_SUFFIX} files in data directory {directory}")
    return files


def count_examples(path: str | os.PathLike) -> int:
    """The count in a `<id>-<count>.tfrec` name, else the number of records in the file."""
    count = count_from_name(path)
    return count if count is not None else _count_records(os.fspath(path))


def check_record_files(files: list[str], image_size: int) -> None:
    """Reads the first record of every file before anything is compiled or written, so
    that records of another tile size, an empty file or one that is not a TFRecord stop
    the run at once, naming the file. Damage further into a file (a truncated copy)
    surfaces when training reads it, and is named then too."""
    for path in files:
        if next(validation_batches([path], image_size=image_size, batch_size=1),
                None) is None:
            raise cli.InputError(f"{path}: holds no records")


def checked_counts(files: Sequence[str], data_dir: str | os.PathLike) -> dict[str, int]:
    """Examples per record file, each checked against the count its name promises and
    the slides `prepare.json` lists, when the directory has one.

    A copy cut exactly at a record boundary reads cleanly, only shorter, and the
    repeated training dataset would hide the shortfall. Tiles of one size make records
    of one size, so a file's size gives its count without reading it; a file whose
    size disagrees (records of several sizes, or a cut) is counted record by record.
    """
    for path in files:
        promised = count_from_name(path)
        if promised is not None and not _size_fits(path, promised):
            counted = _count_records(path)
            if counted != promised:
                raise cli.InputError(f"{path}: holds {counted} records, its name promises "
                                     f"{promised}; a partial copy?")
    _check_against_prepare_record(files, data_dir)
    return {path: count_examples(path) for path in files}


def _size_fits(path: str, count: int) -> bool:
    """Whether the file is exactly `count` records of its first record's size."""
    with paths.path(path).open("rb") as file:
        header = file.read(_RECORD_LENGTH.size)
    if len(header) < _RECORD_LENGTH.size:
        return count == 0 and not header
    record_bytes = _RECORD_LENGTH.unpack(header)[0] + _RECORD_FRAMING_BYTES
    return paths.path(path).stat().length == count * record_bytes


def _check_against_prepare_record(files: Sequence[str], data_dir: str | os.PathLike) -> None:
    """The files must be the slides jaxseg.prepare wrote: a file it does not list is
    another tiling's, and one it lists that is missing was lost in a copy."""
    record = paths.path(data_dir) / "prepare.json"
    if not record.exists():
        return
    slides = paths.read_json(record).get("slides")
    if slides is None:
        return
    listed = {record_name(slide_id, count) for slide_id, count in slides.items()}
    present = {os.path.basename(path): path for path in files}
    unlisted = sorted(set(present) - listed)
    if unlisted:
        raise cli.InputError(f"{present[unlisted[0]]}: not among the slides {record} lists "
                             f"({len(unlisted)} such file(s)); records of another preparation? "
                             "Prepare the data again into an empty folder")
    missing = sorted(listed - set(present))
    if missing:
        raise cli.InputError(f"{record}: lists {missing[0]}, which {data_dir} lacks "
                             f"({len(missing)} such file(s)); an incomplete copy, or a "
                             "jaxseg.prepare stopped while moving records in?")


def kfold_splits(files: Sequence[str], num_folds: int,
                 seed: int) -> list[tuple[list[str], list[str]]]:
    """(train, validation) file lists, fold by fold: the recipe's folds without sklearn.

    Equal to sklearn `KFold(num_folds, shuffle=True, random_state=seed).split` over the
    sorted list: a RandomState permutation cut into contiguous folds, the first
    `len % num_folds` of them one file larger, both sides returned in sorted order.
    """
    ordered = sorted(files)
    if num_folds < 2:
        raise cli.InputError(f"num_folds must be at least 2, got {num_folds}")
    if len(ordered) < num_folds:
        raise cli.InputError(f"{len(ordered)} record files cannot make {num_folds} folds: "
                             "each fold needs at least one file")
    permutation = np.random.RandomState(seed).permutation(len(ordered))
    sizes = np.full(num_folds, len(ordered) // num_folds)
    sizes[:len(ordered) % num_folds] += 1
    splits = []
    for validation_indices in np.split(permutation, np.cumsum(sizes)[:-1]):
        in_validation = np.zeros(len(ordered), dtype=bool)
        in_validation[validation_indices] = True
        splits.append(([f for f, held_out in zip(ordered, in_validation) if not held_out],
                       [f for f, held_out in zip(ordered, in_validation) if held_out]))
    return splits


@dataclasses.dataclass
class FoldData:
    """What one fold trains and validates on, planned for every fold before any runs."""
    fold: int
    train_files: list[str]
    val_files: list[str]
    steps_per_epoch: int
    val_batches: int
    num_train_examples: int
    num_val_examples: int


def fold_plan(config: ml_collections.ConfigDict, fold: int, train_files: list[str],
              val_files: list[str], counts: dict[str, int]) -> FoldData:
    """`counts`: examples per record file, counted once for all folds (a file whose name
    carries no count is read to the end to count it)."""
    num_train = sum(counts[path] for path in train_files)
    global_batch = config.per_device_batch_size * jax.device_count()
    steps_per_epoch = config.steps_per_epoch if config.steps_per_epoch > 0 else (
        num_train // global_batch)
    if steps_per_epoch == 0:
        raise cli.InputError(f"fold {fold}: {num_train} training images are fewer than one global "
                             f"batch of {global_batch}; lower config.per_device_batch_size")
    val_counts = {path: counts[path] for path in val_files}
    val_batches = num_validation_batches(
        val_counts, parallel.host_batch_size(config.per_device_batch_size), jax.process_count(),
        global_order=config.deterministic)
    num_val = sum(val_counts.values())
    return FoldData(fold, train_files, val_files, steps_per_epoch, val_batches, num_train,
                    num_val)


def host_shard(files: Sequence[str], process_index: int, process_count: int) -> list[str]:
    """This host's files: whole files per host, so no two hosts read the same example."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return list(files[process_index::process_count])


def train_batches(files: Sequence[str], *, image_size: int, batch_size: int, steps: int,
                  seed: int, epoch: int, augment_config: ml_collections.ConfigDict,
                  shuffle_buffer: int = 128, deterministic: bool = False,
                  process_index: int = 0, process_count: int = 1,
                  steps_done: int = 0) -> Iterator[Batch]:
    """The host batches of one epoch's steps after the first `steps_done` (those a
    preempted attempt already took), `steps` in all.

    Everything random is seeded by (seed, epoch): file order, shuffle and the per-example
    augmentation seeds. With `deterministic` the epoch is reproduced batch for batch
    (resuming after preemption) whatever the number of hosts: every host reads all files
    in one global order and keeps its rows of each global batch, and an example's
    augmentation follows from its global position. Without it, each host reads its own
    file shard in whatever order finishes first, which is faster, with a seed stream of
    its own.
    """
    shard = list(files) if deterministic else host_shard(files, process_index, process_count)
    if not shard:
        raise cli.InputError(f"host {process_index} of {process_count} has no training files: "
                             f"{len(files)} files cannot be split over {process_count} hosts")
    if deterministic:
        epoch_seed = _epoch_seed(seed, epoch)
    else:
        epoch_seed = _epoch_seed(seed, epoch, *([process_index] if process_count > 1 else []))
        process_index, process_count = 0, 1  # this host's own stream is all it reads
    _check_exist(shard)
    _check_positive(image_size=image_size, batch_size=batch_size, steps=steps,
                    shuffle_buffer=shuffle_buffer)
    if not 0 <= steps_done < steps:
        raise ValueError(f"steps_done must be in [0, {steps}), got {steps_done}")
    augment = augment_fn(augment_config)
    file_order = np.random.RandomState(epoch_seed).permutation(len(shard))

    def prepare(index: tf.Tensor, record: tf.Tensor, path: tf.Tensor) -> dict[str, tf.Tensor]:
        image, mask = _parse(record, path, image_size)
        example_seed = tf.stack([tf.constant(epoch_seed, tf.int32), tf.cast(index, tf.int32)])
        image, mask, colour_factors, warp_params = augment(image, mask, example_seed)
        return {"image": image, "mask": tf.cast(mask, tf.uint8),
                "colour_factors": colour_factors, "warp": warp_params}

    dataset = (_records_with_paths([shard[i] for i in file_order], deterministic,
                                   min(len(shard), _MAX_FILES_READ_AT_ONCE))
               .shuffle(shuffle_buffer, seed=epoch_seed)
               .repeat()
               .enumerate()
               .skip(steps_done * batch_size * process_count))
    dataset = (_rows_of_this_host(dataset, batch_size, process_index, process_count)
               .map(lambda index, pair: prepare(index, *pair),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
               .batch(batch_size, drop_remainder=True)
               .take(steps - steps_done)
               .prefetch(tf.data.AUTOTUNE))
    return _checked_train_batches(_numpy_batches(dataset, shard, image_size),
                                  steps - steps_done, shard)


def validation_batches(files: Sequence[str], *, image_size: int, batch_size: int,
                       process_index: int = 0, process_count: int = 1,
                       num_batches: int | None = None,
                       global_order: bool = False) -> Iterator[Batch]:
    """Every example of this host's shard once, in file order, with a per-example weight.

    Unlike the recipe, which dropped the last partial batch, the last batch is padded
    with zero examples of weight 0. `num_batches` (see `num_validation_batches`) appends
    all-padding batches so that every host runs the same number of collective steps.
    With `global_order` (deterministic runs) every host reads all files and keeps its
    rows of each global batch, so the global batches, and with them the metrics, do
    not depend on the number of hosts.
    """
    shard = list(files) if global_order else host_shard(files, process_index, process_count)
    _check_exist(shard)
    _check_positive(image_size=image_size, batch_size=batch_size)

    def prepare(index: tf.Tensor, pair: tuple[tf.Tensor, tf.Tensor]) -> dict[str, tf.Tensor]:
        image, mask = _parse(*pair, image_size)
        return {"image": image, "mask": tf.cast(mask, tf.uint8)}

    dataset = _records_with_paths(shard, deterministic=True, files_read_at_once=1).enumerate()
    if global_order:
        dataset = _rows_of_this_host(dataset, batch_size, process_index, process_count)
    dataset = (dataset
               .map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
               .batch(batch_size)
               .prefetch(tf.data.AUTOTUNE))
    return _padded_validation_batches(_numpy_batches(dataset, shard, image_size),
                                      image_size, batch_size, num_batches)


def num_validation_batches(counts: Mapping[str, int], batch_size: int,
                           process_count: int, global_order: bool = False) -> int:
    """The largest host's batch count: what every host must run in lockstep. `counts`:
    the examples of each validation file (`count_examples`), in the files' order."""
    if global_order:
        return math.ceil(sum(counts.values()) / (batch_size * process_count))
    files = list(counts)
    return max(math.ceil(sum(counts[f] for f in host_shard(files, p, process_count))
                         / batch_size)
               for p in range(process_count))


def _check_exist(files: Sequence[str]) -> None:
    """Up front: tf.data would only fail at the first read, naming no file in the message."""
    for path in files:
        if not tf.io.gfile.exists(path):
            raise cli.MissingInput(f"record file {path} does not exist")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")


def _epoch_seed(seed: int, epoch: int, *stream: int) -> int:
    """Mixes (seed, epoch, a host's stream) into one seed, unrelated for nearby values;
    31 bits fit int32."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed} epoch={epoch}")
    return int(np.random.SeedSequence([seed, epoch, *stream]).generate_state(1)[0] >> 1)


def _rows_of_this_host(indexed: tf.data.Dataset, batch_size: int, process_index: int,
                       process_count: int) -> tf.data.Dataset:
    """Of a stream of (global position, element), the elements at this host's rows
    [p * batch_size, (p + 1) * batch_size) of every global batch; filtered before any
    decoding, so a host decodes only its own examples."""
    global_batch = batch_size * process_count
    return indexed.filter(
        lambda index, _: (index % global_batch) // batch_size == process_index)


def _records_with_paths(files: Sequence[str], deterministic: bool,
                        files_read_at_once: int) -> tf.data.Dataset:
    """(serialized record, file path) pairs, reading several files in parallel."""
    return tf.data.Dataset.from_tensor_slices(tf.constant(list(files), tf.string)).interleave(
        lambda path: tf.data.TFRecordDataset(path).map(lambda record: (record, path)),
        cycle_length=files_read_at_once, block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)


def _parse(record: tf.Tensor, path: tf.Tensor, image_size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """uint8 (D, D, 3) image and bool (D, D, 1) mask, after checking the byte lengths."""
    example = tf.io.parse_single_example(record, _FEATURES)
    checks = [_assert_length(example[feature], expected, feature, path)
              for feature, expected in (("image", image_size * image_size * 3),
                                        ("mask", image_size * image_size))]
    with tf.control_dependencies(checks):
        image = tf.reshape(tf.io.decode_raw(example["image"], tf.uint8),
                           (image_size, image_size, 3))
        mask = tf.reshape(tf.io.decode_raw(example["mask"], tf.bool),
                          (image_size, image_size, 1))
    return image, mask


def _assert_length(raw: tf.Tensor, expected: int, feature: str, path: tf.Tensor) -> tf.Operation:
    """The tagged data lets `_bad_record_message` name the file in a one-line error."""
    length = tf.strings.length(raw)
    return tf.debugging.Assert(tf.equal(length, expected),
                               [_BAD_RECORD_TAG, path, feature, length])


def _numpy_batches(dataset: tf.data.Dataset, files: Sequence[str],
                   image_size: int) -> Iterator[Batch]:
    """Iterates the dataset, turning tf.data runtime errors into ones naming the file."""
    iterator = dataset.as_numpy_iterator()
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except tf.errors.DataLossError as error:
            for path in files:
                _count_records(path)  # raises naming the damaged file
            raise cli.InputError(f"corrupt TFRecord data in {', '.join(files)}: "
                                 f"{_first_line(error)}") from error
        except tf.errors.InvalidArgumentError as error:
            raise cli.InputError(_bad_record_message(error, image_size, files)) from error
        except UnicodeDecodeError as error:
            # TensorFlow quotes an unparsable record in its message, then fails to decode it.
            raise cli.InputError(f"cannot parse records in {', '.join(files)}: a record is not "
                                 "a tf.train.Example") from error
        yield batch


def _bad_record_message(error: tf.errors.OpError, image_size: int,
                        files: Sequence[str]) -> str:
    match = _BAD_RECORD_MESSAGE.search(error.message)
    if match is None:
        return f"cannot parse records in {', '.join(files)}: {_first_line(error)}"
    shape = (f"{image_size}x{image_size}x3 uint8" if match["feature"] == "image"
             else f"{image_size}x{image_size} bool")
    return (f"{match['path']}: a record's {match['feature']} has {match['length']} bytes, "
            f"not those of a {shape} tile; do the records match image_size={image_size}?")


def _first_line(error: tf.errors.OpError) -> str:
    """TensorFlow's own words, without its graph-node prefix and op suffix, kept short."""
    text = _TF_MESSAGE_NOISE.sub("", error.message).strip().splitlines()[0]
    return text if len(text) <= _MAX_DETAIL else text[:_MAX_DETAIL] + "..."


def _count_records(path: str) -> int:
    try:
        return int(tf.data.TFRecordDataset(path).reduce(np.int64(0), lambda n, _: n + 1))
    except tf.errors.NotFoundError:
        raise cli.MissingInput(f"record file {path} does not exist") from None
    except tf.errors.DataLossError as error:
        raise cli.InputError(f"{path}: truncated or corrupt TFRecord file "
                             f"({_first_line(error)})") from None


def _checked_train_batches(batches: Iterator[Batch], steps: int,
                           files: Sequence[str]) -> Iterator[Batch]:
    """Only an empty shard can end a repeated dataset early; say so instead of stalling."""
    produced = 0
    for batch in batches:
        produced += 1
        yield batch
    if produced < steps:
        raise cli.InputError(f"no training examples in {', '.join(files)}")


def _padded_validation_batches(batches: Iterator[Batch], image_size: int, batch_size: int,
                               num_batches: int | None) -> Iterator[Batch]:
    produced = 0
    for batch in batches:
        produced += 1
        if num_batches is not None and produced > num_batches:
            raise cli.InputError(f"validation files hold more than num_batches={num_batches} "
                                 f"batches of {batch_size}; are the counts in their names "
                                 "wrong?")
        yield _pad_batch(batch, batch_size)
    for _ in range(produced, num_batches or 0):
        yield _pad_batch(_empty_batch(image_size), batch_size)


def _pad_batch(batch: Batch, batch_size: int) -> Batch:
    real = len(batch["image"])
    padded = {key: np.concatenate([value, np.zeros((batch_size - real,) + value.shape[1:],
                                                   value.dtype)])
              if real < batch_size else value
              for key, value in batch.items()}
    padded["weight"] = (np.arange(batch_size) < real).astype(np.float32)
    return padded


def _empty_batch(image_size: int) -> Batch:
    return {"image": np.zeros((0, image_size, image_size, 3), np.uint8),
            "mask": np.zeros((0, image_size, image_size, 1), np.uint8)}
