"""Input pipeline: file listing, counts, folds, host shards, batches and bad-record errors."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from sklearn.model_selection import KFold

from jaxseg import colour, warp
from jaxseg.augment import default_augment_config
from jaxseg.data import (checked_counts, count_examples, host_shard, kfold_splits,
                         list_record_files, num_validation_batches, train_batches,
                         validation_batches)
from jaxseg.records import serialize_example, write_records

SIZE = 16
# Examples per slide; 24 in all, a multiple of the batch size used below.
SLIDE_SIZES = {"slide0": 5, "slide1": 7, "slide2": 3, "slide3": 9}


def _tile(example_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Channel 0 is the example id everywhere, so any flip or rotation keeps it readable."""
    rng = np.random.default_rng(example_id)
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    image[..., 0] = example_id
    return image, rng.random((SIZE, SIZE)) > 0.5


def _ids(batch_images: np.ndarray) -> list[int]:
    return [int(image[0, 0, 0]) for image in batch_images]


@pytest.fixture(scope="module")
def record_dir(tmp_path_factory) -> Path:
    """Four slides whose example ids run 1..24 in sorted file order."""
    directory = tmp_path_factory.mktemp("records")
    next_id = 1
    for slide, count in SLIDE_SIZES.items():
        write_records(directory, slide, [_tile(i) for i in range(next_id, next_id + count)])
        next_id += count
    return directory


@pytest.fixture(scope="module")
def files(record_dir) -> list[str]:
    return list_record_files(record_dir)


GEOMETRY_ONLY = dict(saturation_prob=0.0, contrast_prob=0.0, brightness_prob=0.0)


def _augment_config(**overrides):
    config = default_augment_config()
    config.update(overrides)
    return config


def _train(files, **overrides):
    """Uncompiled geometric augmentation keeps ids readable and skips XLA compile time."""
    arguments = dict(image_size=SIZE, batch_size=4, steps=6, seed=0, epoch=0,
                     augment_config=_augment_config(xla_compile=False, **GEOMETRY_ONLY))
    arguments.update(overrides)
    return list(train_batches(files, **arguments))


def test_list_record_files_is_sorted_and_skips_other_files(record_dir, files):
    (record_dir / "notes.txt").write_text("not a record")
    assert files == sorted(files)
    assert [Path(f).name for f in list_record_files(record_dir)] == [
        "slide0-5.tfrec", "slide1-7.tfrec", "slide2-3.tfrec", "slide3-9.tfrec"]


def test_list_record_files_names_missing_or_empty_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'absent'} does not exist"):
        list_record_files(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=f"no .*tfrec files .*{tmp_path}"):
        list_record_files(tmp_path)


def test_count_examples_from_name_and_by_counting(files, tmp_path):
    assert [count_examples(f) for f in files] == list(SLIDE_SIZES.values())
    unnamed = tmp_path / "slide.tfrec"
    os.rename(write_records(tmp_path, "slide", [_tile(i) for i in range(6)]), unnamed)
    assert count_examples(unnamed) == 6


def test_count_examples_names_a_truncated_file(tmp_path):
    path = tmp_path / "slide.tfrec"
    path.write_bytes(Path(write_records(tmp_path, "s", [_tile(1), _tile(2)])).read_bytes()[:-9])
    with pytest.raises(ValueError, match=f"{path}: truncated or corrupt"):
        count_examples(path)


def test_a_file_cut_at_a_record_boundary_is_named(record_dir, files, tmp_path):
    """Every record of the copy is whole, so reading it raises nothing: only the count
    in its name shows that two of seven are missing."""
    cut = tmp_path / "slide1-7.tfrec"
    raw = Path(files[1]).read_bytes()
    cut.write_bytes(raw[:len(raw) // 7 * 5])
    assert len(list(tf.data.TFRecordDataset(str(cut)))) == 5
    with pytest.raises(ValueError, match=f"^{cut}: holds 5 records, its name promises 7; "
                                         "a partial copy\\?$"):
        checked_counts([str(cut)], tmp_path)
    assert checked_counts(files, record_dir) == dict(zip(files, SLIDE_SIZES.values()))


def test_files_must_be_the_slides_prepare_json_lists(record_dir, files, tmp_path):
    (tmp_path / "prepare.json").write_text(json.dumps({"reduction": 2, "slides": {
        "slide0": 5, "slide1": 7, "slide2": 3, "slide3": 9}}))
    assert checked_counts(files, tmp_path) == dict(zip(files, SLIDE_SIZES.values()))
    with pytest.raises(ValueError, match=f"^{tmp_path / 'prepare.json'}: lists "
                                         f"slide3-9.tfrec, which {tmp_path} lacks"):
        checked_counts(files[:3], tmp_path)
    (tmp_path / "prepare.json").write_text(json.dumps({"slides": {
        "slide0": 5, "slide1": 7, "slide2": 3, "slide3": 8}}))
    with pytest.raises(ValueError, match=f"^{files[3]}: not among the slides "
                                         f"{tmp_path / 'prepare.json'} lists"):
        checked_counts(files, tmp_path)
    (tmp_path / "prepare.json").write_text(json.dumps({"reduction": 2}))   # made elsewhere
    assert checked_counts(files, tmp_path) == dict(zip(files, SLIDE_SIZES.values()))


@pytest.mark.parametrize("num_files,num_folds,seed",
                         [(4, 2, 0), (5, 4, 0), (7, 3, 1), (16, 4, 0), (16, 5, 42), (9, 9, 3)])
def test_kfold_splits_equal_sklearn(num_files, num_folds, seed):
    names = [f"slide{i:02d}-{i}.tfrec" for i in range(num_files)]
    shuffled = list(np.random.default_rng(seed).permutation(names))
    expected = [([names[i] for i in train], [names[i] for i in held_out])
                for train, held_out in
                KFold(n_splits=num_folds, shuffle=True, random_state=seed).split(names)]
    assert kfold_splits(shuffled, num_folds, seed) == expected


def test_kfold_splits_needs_a_file_per_fold():
    with pytest.raises(ValueError, match="3 record files cannot make 4 folds"):
        kfold_splits(["a", "b", "c"], 4, 0)
    with pytest.raises(ValueError, match="num_folds must be at least 2"):
        kfold_splits(["a", "b", "c"], 1, 0)


@pytest.mark.parametrize("num_files,process_count", [(4, 1), (4, 2), (5, 2), (7, 3), (3, 3)])
def test_host_shards_partition_the_files(num_files, process_count):
    names = [f"f{i}" for i in range(num_files)]
    shards = [host_shard(names, p, process_count) for p in range(process_count)]
    assert sorted(sum(shards, [])) == names
    assert all(shard for shard in shards)
    with pytest.raises(ValueError, match="process_index"):
        host_shard(names, process_count, process_count)


def test_validation_yields_every_example_once_in_order_with_padding(files):
    batches = list(validation_batches(files, image_size=SIZE, batch_size=5))
    assert len(batches) == 5  # 24 examples
    ids = [i for b in batches for i, w in zip(_ids(b["image"]), b["weight"]) if w == 1]
    assert ids == list(range(1, 25))
    np.testing.assert_array_equal(batches[-1]["weight"], [1, 1, 1, 1, 0])
    assert not batches[-1]["image"][4].any() and not batches[-1]["mask"][4].any()
    for batch in batches:
        assert batch["image"].shape == (5, SIZE, SIZE, 3) and batch["image"].dtype == np.uint8
        assert batch["mask"].shape == (5, SIZE, SIZE, 1) and batch["mask"].dtype == np.uint8
        assert batch["weight"].dtype == np.float32


def test_validation_returns_tiles_exactly_as_written(files):
    batch = next(validation_batches(files, image_size=SIZE, batch_size=3))
    for position, example_id in enumerate((1, 2, 3)):
        image, mask = _tile(example_id)
        np.testing.assert_array_equal(batch["image"][position], image)
        np.testing.assert_array_equal(batch["mask"][position, ..., 0], mask)


def test_validation_hosts_cover_all_examples_in_the_same_number_of_steps(files):
    num_batches = num_validation_batches({f: count_examples(f) for f in files}, batch_size=4,
                                         process_count=3)
    # Hosts hold slides (0, 3), (1,) and (2,): 14, 7 and 3 examples.
    assert num_batches == 4
    seen = []
    for host in range(3):
        batches = list(validation_batches(files, image_size=SIZE, batch_size=4,
                                          process_index=host, process_count=3,
                                          num_batches=num_batches))
        assert len(batches) == num_batches
        seen += [i for b in batches for i, w in zip(_ids(b["image"]), b["weight"]) if w == 1]
        weights = np.concatenate([b["weight"] for b in batches])
        assert weights.sum() == sum(count_examples(f) for f in host_shard(files, host, 3))
    assert sorted(seen) == list(range(1, 25))


def test_validation_rejects_more_batches_than_num_batches(files):
    with pytest.raises(ValueError, match="more than num_batches=2"):
        list(validation_batches(files, image_size=SIZE, batch_size=4, num_batches=2))


def test_train_epoch_has_exactly_steps_batches_of_augmented_examples(files):
    batches = _train(files, augment_config=default_augment_config(), steps=9)
    assert len(batches) == 9
    for batch in batches:
        assert batch["image"].shape == (4, SIZE, SIZE, 3) and batch["image"].dtype == np.uint8
        assert batch["mask"].shape == (4, SIZE, SIZE, 1) and batch["mask"].dtype == np.uint8
        assert set(np.unique(batch["mask"])) <= {0, 1}
        assert batch["colour_factors"].shape == (4, colour.NUM_FACTORS)
        assert batch["colour_factors"].dtype == np.float32
        assert batch["warp"].shape == (4, warp.NUM_PARAMS)
        np.testing.assert_array_equal(batch["warp"], np.tile(warp.IDENTITY, (4, 1)))
    factors = np.concatenate([batch["colour_factors"] for batch in batches])
    drawn = factors != colour.IDENTITY
    assert drawn.any() and not drawn.all()


def test_shift_scale_rotate_parameters_reach_the_batches(files):
    config = default_augment_config()
    config.shift_scale_rotate_prob = 0.5
    params = np.concatenate([batch["warp"] for batch in _train(files, augment_config=config,
                                                                steps=9)])
    drawn = (params != warp.IDENTITY).all(axis=1)
    assert drawn.any() and not drawn.all()
    assert (params[~drawn] == warp.IDENTITY).all()


@pytest.mark.parametrize("deterministic", [True, False])
def test_train_epoch_sees_each_example_once_when_steps_cover_the_data(files, deterministic):
    batches = _train(files, deterministic=deterministic)
    ids = [i for b in batches for i in _ids(b["image"])]
    assert sorted(ids) == list(range(1, 25))
    assert ids != list(range(1, 25))


def _symmetries(array: np.ndarray) -> list[np.ndarray]:
    return [np.rot90(flipped, k) for flipped in (array, np.fliplr(array)) for k in range(4)]


def test_train_masks_follow_their_images(files):
    for batch in _train(files):
        for image, mask in zip(batch["image"], batch["mask"]):
            original_image, original_mask = _tile(int(image[0, 0, 0]))
            moved = [np.array_equal(image, candidate)
                     for candidate in _symmetries(original_image)]
            assert sum(moved) == 1
            np.testing.assert_array_equal(mask[..., 0],
                                          _symmetries(original_mask)[moved.index(True)])


def test_deterministic_train_epoch_is_reproducible(files):
    arguments = dict(augment_config=default_augment_config(), deterministic=True, seed=3)
    first, again = _train(files, **arguments), _train(files, **arguments)
    for a, b in zip(first, again, strict=True):
        for key in ("image", "mask", "colour_factors", "warp"):
            np.testing.assert_array_equal(a[key], b[key])
    next_epoch = _train(files, **arguments, epoch=1)
    assert not np.array_equal(first[0]["image"], next_epoch[0]["image"])


def test_train_reads_only_this_hosts_files(files):
    batches = _train(files, process_index=1, process_count=2, steps=4)
    # Host 1 of 2 holds slide1 (ids 6..12) and slide3 (ids 16..24).
    assert set(i for b in batches for i in _ids(b["image"])) == (
        set(range(6, 13)) | set(range(16, 25)))


def test_train_needs_files_and_examples_on_every_host(files, tmp_path):
    with pytest.raises(ValueError, match="host 4 of 5 has no training files"):
        _train(files, process_index=4, process_count=5)
    empty = tmp_path / "empty-0.tfrec"     # what a TFRecord writer leaves for no records
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="no training examples in .*empty-0.tfrec"):
        _train([str(empty)])


def test_missing_file_is_named_before_reading(files, tmp_path):
    missing = str(tmp_path / "gone-3.tfrec")
    with pytest.raises(FileNotFoundError, match=f"record file {missing} does not exist"):
        _train(files + [missing])
    with pytest.raises(FileNotFoundError, match=f"record file {missing} does not exist"):
        validation_batches([missing], image_size=SIZE, batch_size=4)


def _write_raw_records(path: Path, serialized: list[bytes]) -> str:
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in serialized:
            writer.write(record)
    return str(path)


def test_wrong_tile_size_names_the_file_and_size(files, tmp_path):
    big = np.zeros((SIZE * 2, SIZE * 2, 3), np.uint8)
    bad = _write_raw_records(tmp_path / "big-1.tfrec",
                             [serialize_example(big, np.zeros((SIZE * 2, SIZE * 2), bool))])
    message = (f"{bad}: a record's image has {SIZE * SIZE * 12} bytes, not those of a "
               f"{SIZE}x{SIZE}x3 uint8 tile; do the records match image_size={SIZE}")
    with pytest.raises(ValueError, match=message):
        list(validation_batches(files + [bad], image_size=SIZE, batch_size=4))
    # 7 steps of 4 pass all 25 examples through the parse, whatever order they come in
    # (6 steps missed the bad one about once in 25 runs).
    with pytest.raises(ValueError, match=message):
        _train(files + [bad], deterministic=False, steps=7)


def test_missing_mask_names_the_file(tmp_path):
    image_only = tf.train.Example(features=tf.train.Features(feature={"image": tf.train.Feature(
        bytes_list=tf.train.BytesList(value=[_tile(1)[0].tobytes()]))})).SerializeToString()
    bad = _write_raw_records(tmp_path / "nomask-1.tfrec", [image_only])
    with pytest.raises(ValueError, match=f"{bad}: a record's mask has 0 bytes"):
        list(validation_batches([bad], image_size=SIZE, batch_size=4))


def test_truncated_file_names_the_file(files, tmp_path):
    truncated = tmp_path / "cut-3.tfrec"
    truncated.write_bytes(Path(files[1]).read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{truncated}: truncated or corrupt TFRecord"):
        list(validation_batches(files + [str(truncated)], image_size=SIZE, batch_size=4))
    with pytest.raises(ValueError, match=f"{truncated}: truncated or corrupt TFRecord"):
        _train([files[0], str(truncated)], steps=20)


@pytest.mark.parametrize("junk", [b"\xff\xfe binary", b"plain text"])
def test_non_example_records_give_one_clear_line(tmp_path, junk):
    bad = _write_raw_records(tmp_path / "junk-1.tfrec", [junk])
    with pytest.raises(ValueError, match=f"cannot parse records in .*{bad}") as error:
        list(validation_batches([bad], image_size=SIZE, batch_size=4))
    assert "\n" not in str(error.value)


def _rows_of_hosts(batches_per_host: list[list[dict]], key: str) -> list[np.ndarray]:
    """Each global batch as the hosts' batches put side by side, host 0 first."""
    return [np.concatenate([host[step][key] for host in batches_per_host])
            for step in range(len(batches_per_host[0]))]


def test_deterministic_global_batches_do_not_depend_on_the_host_count(files):
    """Two hosts of 2 rows each see, between them, one host's batches of 4, row for row
    and with the same augmentation."""
    arguments = dict(augment_config=default_augment_config(), deterministic=True, seed=3)
    one_host = _train(files, **arguments)
    two_hosts = [_train(files, batch_size=2, process_index=host, process_count=2, **arguments)
                 for host in range(2)]
    for key in ("image", "mask", "colour_factors", "warp"):
        for single, joined in zip([b[key] for b in one_host], _rows_of_hosts(two_hosts, key),
                                  strict=True):
            np.testing.assert_array_equal(single, joined)


def test_a_resumed_deterministic_epoch_continues_where_it_stopped(files):
    arguments = dict(augment_config=default_augment_config(), deterministic=True, seed=3)
    whole = _train(files, **arguments)
    rest = _train(files, steps_done=4, **arguments)
    assert len(rest) == 2
    for a, b in zip(whole[4:], rest, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["colour_factors"], b["colour_factors"])


def test_validation_in_global_order_does_not_depend_on_the_host_count(files):
    counts = {f: count_examples(f) for f in files}
    """24 examples in global batches of 10: in the last, host 0 holds the 4 real rows and
    host 1 only padding."""
    one_host = list(validation_batches(files, image_size=SIZE, batch_size=10))
    num_batches = num_validation_batches(counts, batch_size=5, process_count=2,
                                         global_order=True)
    two_hosts = [list(validation_batches(files, image_size=SIZE, batch_size=5,
                                         process_index=host, process_count=2,
                                         num_batches=num_batches, global_order=True))
                 for host in range(2)]
    assert num_batches == len(one_host) == 3
    for key in ("image", "weight"):
        for single, joined in zip([b[key] for b in one_host], _rows_of_hosts(two_hosts, key),
                                  strict=True):
            np.testing.assert_array_equal(single, joined)
