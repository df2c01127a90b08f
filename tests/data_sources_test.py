"""The generic image path: ragged classes, image folders, caches, splits, Python data and
TFDS (through ``tfds.testing.mock_data``), and the real Omniglot and mini-ImageNet files
laid out as folders, which must give exactly the dedicated loaders' tasks."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from maml_tf import data as data_lib
from maml_tf.config import Config
from maml_tf.data import few_shot, generic, omniglot, python_source, sources
from maml_tf.data.classes import ClassImages
from maml_tf.data.errors import DataError


def _write(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def _ragged_folder(root: str, sizes=(3, 5, 8, 4, 6, 7, 2, 9), split_folders=False) -> None:
    """Class k at ``a<k%2>/class<k>``; image i of class k is a constant of value 10k + i, so
    every pixel names its class and image. Mixed sizes, modes and formats."""
    for k, n in enumerate(sizes):
        top = ("train", "val", "test")[k % 3] if split_folders else f"a{k % 2}"
        for i in range(n):
            value = np.uint8(10 * k + i)
            shape = (8, 8) if i % 2 else (12, 10)
            if i % 3 == 0:
                _write(f"{root}/{top}/class{k}/img{i}.png", np.full(shape, value, np.uint8))
            else:
                _write(f"{root}/{top}/class{k}/img{i}.png", np.full(shape + (3,), value, np.uint8))


def _config(root, cache, **kw) -> Config:
    kw = {"dataset": "folder", "data_dir": str(root), "cache_dir": str(cache), "image_size": 8,
          "channels": 1, **kw}
    return Config(**kw)


# -- the sampler ------------------------------------------------------------------------------
def test_ragged_classes_are_sampled_without_replacement_from_their_own_images():
    counts = [3, 9, 4, 12, 5]
    labels = np.concatenate([np.full(n, k) for k, n in enumerate(counts)])
    index = np.concatenate([np.arange(n) for n in counts])
    images = (16 * labels + index).astype(np.uint8)[:, None, None, None]
    classes = ClassImages.from_labelled(images, labels)
    seen = {k: set() for k in range(5)}
    for i in range(200):
        sx, sy, qx, qy, chosen = few_shot.sample_task(classes, 5, tf.constant(i, tf.int64), 3, 1, 2)
        values = np.round(np.concatenate([sx.numpy(), qx.numpy()])[:, 0, 0, 0] * 255).astype(int)
        ys = np.concatenate([sy.numpy(), qy.numpy()])
        for label in range(3):
            cls = values[ys == label] // 16
            assert len(set(cls)) == 1 and cls[0] == chosen.numpy()[label]
            drawn = values[ys == label] % 16
            assert len(set(drawn)) == 3 and max(drawn) < counts[cls[0]]   # distinct, in range
            seen[cls[0]].update(drawn)
    for k, n in enumerate(counts):   # every image of every class is reachable
        assert seen[k] == set(range(n))


def test_equal_classes_give_the_tasks_of_a_grouped_array_with_either_gather():
    grouped = np.random.RandomState(0).randint(0, 255, (7, 6, 3, 3, 1)).astype(np.uint8)
    a = ClassImages.from_grouped(grouped)
    b = ClassImages(a.images.copy(), a.starts, a.counts, a.names)
    numpy_gather = few_shot.gather_fn(b)
    old = few_shot.CONSTANT_BYTES
    try:
        few_shot.CONSTANT_BYTES = 0   # the memory-map path: a NumPy gather
        numpy_gather = few_shot.gather_fn(b)
    finally:
        few_shot.CONSTANT_BYTES = old
    for i in range(5):
        x = few_shot.sample_task(a, 1, tf.constant(i, tf.int64), 4, 2, 1)
        y = few_shot.sample_task(b, 1, tf.constant(i, tf.int64), 4, 2, 1, gather=numpy_gather)
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u.numpy(), v.numpy())


# -- folders ----------------------------------------------------------------------------------
def test_folder_reads_ragged_classes_and_skips_bad_files(tmp_path, caplog):
    root = tmp_path / "data"
    _ragged_folder(str(root))
    (root / "a0" / "class0" / "broken.png").write_bytes(b"not an image")
    (root / "README.txt").write_text("notes")
    (root / "a1" / "class1" / ".DS_Store").write_bytes(b"\0")
    config = _config(root, tmp_path / "cache", class_split=(4, 2, 2))
    with caplog.at_level("WARNING"):
        loaded = generic.load(config)
    assert "broken.png" in caplog.text and "1 unreadable" in caplog.text
    every = {n: c for s in loaded.splits.values() for n, c in zip(s.names, s.counts)}
    assert every == {f"a{k % 2}/class{k}": n for k, n in enumerate((3, 5, 8, 4, 6, 7, 2, 9))}
    # Pixels survive exactly (constant images: any filter keeps a constant) in file order.
    train = loaded.splits["train"]
    for c, name in enumerate(train.names):
        k = int(name.split("class")[1])
        rows = train.images[train.starts[c]:train.starts[c] + train.counts[c], 0, 0, 0]
        np.testing.assert_array_equal(rows, 10 * k + np.arange(train.counts[c]))
    with pytest.raises(DataError, match="broken.png"):
        generic.load(config.replace(strict_data=True))


def test_cache_is_reused_rebuilt_when_files_change_and_fingerprint_survives_a_move(tmp_path,
                                                                                   caplog):
    root = tmp_path / "data"
    _ragged_folder(str(root))
    config = _config(root, tmp_path / "cache", class_split=(4, 2, 2))
    first = generic.load(config)
    with caplog.at_level("INFO"):
        again = generic.load(config)
    assert "Decoding" not in caplog.text and again.fingerprint == first.fingerprint
    _write(f"{root}/a0/class0/img0.png", np.full((8, 8), 200, np.uint8))   # a changed image
    os.utime(root / "a0" / "class0" / "img0.png", ns=(1, 1))
    with caplog.at_level("INFO"):
        changed = generic.load(config)
    assert "made from other data" in caplog.text and changed.fingerprint != first.fingerprint
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)   # new modification times, same pixels
    assert generic.load(config.replace(data_dir=str(moved))).fingerprint == changed.fingerprint


def test_a_cache_larger_than_memory_is_read_row_by_row_with_the_same_tasks(tmp_path, monkeypatch):
    from maml_tf.data.rowfile import RowFile
    root = tmp_path / "data"
    _ragged_folder(str(root))
    config = _config(root, tmp_path / "cache", class_split=(4, 2, 2), way=3, shot=1, query=1)
    in_memory = generic.load(config).splits["train"]
    monkeypatch.setattr(sources, "IN_MEMORY_BYTES", 0)
    on_disk = generic.load(config).splits["train"]
    assert isinstance(on_disk.images, RowFile) and isinstance(in_memory.images, np.ndarray)
    np.testing.assert_array_equal(on_disk.contiguous().images, in_memory.contiguous().images)
    for i in range(4):
        a = few_shot.sample_task(in_memory, 3, tf.constant(i, tf.int64), 3, 1, 1)
        b = few_shot.sample_task(on_disk, 3, tf.constant(i, tf.int64), 3, 1, 1)
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u.numpy(), v.numpy())


def test_splits_from_folders_split_files_and_seeded_counts(tmp_path):
    root = tmp_path / "data"
    _ragged_folder(str(root), split_folders=True)
    own = generic.load(_config(root, tmp_path / "c"))
    assert [list(own.splits[s].names) for s in ("train", "val", "test")] == [
        ["train/class0", "train/class3", "train/class6"], ["val/class1", "val/class4", "val/class7"],
        ["test/class2", "test/class5"]]
    split_file = tmp_path / "split.json"   # last-folder names, in the file's order
    split_file.write_text(json.dumps({"train": ["class6", "class0"], "val": ["val/class1"],
                                      "test": ["class5"]}))
    listed = generic.load(_config(root, tmp_path / "c", split_file=str(split_file)))
    assert listed.splits["train"].names == ("train/class6", "train/class0")
    seeded = [generic.load(_config(root, tmp_path / "c", class_split=(4, 2, 2), seed=s))
              for s in (0, 1)]
    names = [sorted(sum((list(x.splits[s].names) for s in x.splits), [])) for x in seeded]
    assert names[0] == names[1] and len(set(names[0])) == 8   # disjoint, all used, seed-free
    assert seeded[0].splits["train"].names == seeded[1].splits["train"].names
    split_file.write_text(json.dumps({"train": ["class0"], "val": ["class0"], "test": ["class5"]}))
    with pytest.raises(DataError, match="in both the train and the val split"):
        generic.load(_config(root, tmp_path / "c", split_file=str(split_file)))
    split_file.write_text(json.dumps({"train": ["class0"], "test": ["class5"]}))
    with pytest.raises(DataError, match="no 'val'"):
        generic.load(_config(root, tmp_path / "c", split_file=str(split_file)))


@pytest.mark.parametrize("case,message", [
    ("missing", "does not exist"),
    ("empty", "holds no images"),
    ("flat", "holds images directly"),
    ("no_split", "no split into train, val and test"),
    ("too_many", "asks for 9 classes but the data has 8"),
    ("unknown_class", "are not classes of the data"),
])
def test_bad_folders_get_one_paragraph(tmp_path, case, message):
    root = tmp_path / "data"
    kw = {"class_split": (4, 2, 2)}
    if case == "empty":
        (root / "sub").mkdir(parents=True)
    elif case == "flat":
        _write(f"{root}/x.png", np.zeros((8, 8), np.uint8))
    elif case != "missing":
        _ragged_folder(str(root))
    if case == "no_split":
        kw = {}
    elif case == "too_many":
        kw = {"class_split": (5, 2, 2)}
    elif case == "unknown_class":
        (tmp_path / "s.json").write_text(json.dumps({"train": ["nope"], "val": [], "test": []}))
        kw = {"split_file": str(tmp_path / "s.json")}
    with pytest.raises(DataError, match=message):
        generic.load(_config(root, tmp_path / "cache", **kw))


def test_small_classes_are_left_out_by_name_and_too_few_is_refused(tmp_path, caplog):
    root = tmp_path / "data"
    _ragged_folder(str(root))
    config = _config(root, tmp_path / "cache", class_split=(4, 2, 2), way=2, shot=2, query=2,
                     seed=0)
    train = data_lib.split_images(config, "train")
    small = [n for n, c in zip(train.names, train.counts) if c < 4]
    with caplog.at_level("WARNING"):
        usable = data_lib.usable_classes(config, "train", 2)
    assert usable.num_classes == train.num_classes - len(small)
    for name in small:
        assert name in caplog.text
    with pytest.raises(DataError, match="too few for --way=4"):
        data_lib.check_split(config.replace(way=4, shot=5, query=3), "train", 5)


# -- Python data ----------------------------------------------------------------------------
def test_python_arrays_file_lists_and_datasets_give_the_same_classes(tmp_path):
    rng = np.random.RandomState(0)
    images = rng.randint(0, 255, (30, 6, 6, 3)).astype(np.uint8)
    labels = np.repeat(["cat", "dog", "eel"], 10)
    from_arrays = python_source.prepare((images, labels)).classes
    assert from_arrays.names == ("cat", "dog", "eel") and from_arrays.image_shape == (6, 6, 3)
    floats = python_source.prepare((images / 255.0, labels)).classes
    np.testing.assert_array_equal(floats.images, from_arrays.images)
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    np.testing.assert_array_equal(python_source.prepare(ds).classes.images, from_arrays.images)
    dicts = tf.data.Dataset.from_tensor_slices({"image": images, "kind": labels})
    assert python_source.prepare(dicts, label_key="kind").classes.names == from_arrays.names
    paths = []
    for i, x in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(x).save(paths[-1])
    files = python_source.prepare((paths, labels), image_size=6).classes
    np.testing.assert_array_equal(files.images, from_arrays.images)
    splits = python_source.prepare({"train": (images[:20], labels[:20]),
                                    "val": (images[20:], labels[20:]), "test": (images, labels)})
    assert splits.own["train"] == ["train/cat", "train/dog"] and splits.own["test"][0] == "test/cat"
    gray = python_source.prepare((images, labels), image_size=4, channels=1).classes
    assert gray.image_shape == (4, 4, 1)
    assert python_source.prepare((images[::-1], labels)).fingerprint != \
        python_source.prepare((images, labels)).fingerprint
    for bad, message in [((images * 2.0, labels), "must lie in \\[0, 1\\]"),
                         ((images, labels[:5]), "one label per image"),
                         ({"training": (images, labels)}, "must be the splits")]:
        with pytest.raises(DataError, match=message):
            python_source.prepare(bad)


# -- TFDS -------------------------------------------------------------------------------------
def test_tfds_image_classification_sets_through_mock_data(tmp_path):
    import tensorflow_datasets as tfds
    with tfds.testing.mock_data(num_examples=60):
        config = Config(dataset="tfds:cifar100", cache_dir=str(tmp_path), image_size=16,
                        class_split=(2, 2, 2), way=2)
        loaded = generic.load(config)
        every = sum(int(s.counts.sum()) for s in loaded.splits.values())
        assert loaded.splits["train"].image_shape == (16, 16, 3) and every <= 180
        coarse = generic.load(config.replace(label_key="coarse_label"))
        assert coarse.fingerprint != loaded.fingerprint
        with pytest.raises(DataError, match="features are .*coarse_label.*label"):
            generic.load(config.replace(label_key="fine"))
    with pytest.raises(DataError, match="did you mean cifar100"):
        generic.load(Config(dataset="tfds:cifar1000", cache_dir=str(tmp_path)))


# -- the real data as folders ------------------------------------------------------------------
def test_omniglot_written_as_folders_gives_the_dedicated_loaders_tasks(omniglot_dir, tmp_path):
    # The validation characters of the cbfinn split, written as the official layout
    # (alphabet/character/XXXX_YY.png, paper white), read back by the generic folder path with
    # a splits.json in the split's own order: the same classes, pixels and tasks (rotations too).
    raw = omniglot.load_raw(omniglot_dir, "npz")
    every = np.concatenate([raw[p] for p in omniglot.PARTS])
    split = omniglot.split_indices("cbfinn")
    root = tmp_path / "omniglot"
    lists = {}
    for name, chars in (("train", split["train"][:5]), ("val", split["val"]),
                        ("test", split["test"][:5])):
        lists[name] = []
        for c in chars:
            folder_name = f"alphabet{c // 20:02d}/character{c:04d}"
            lists[name].append(folder_name)
            for d in range(20):
                _write(f"{root}/{folder_name}/{c:04d}_{d + 1:02d}.png",
                       every[c, d].astype(np.uint8) * 255)
    (root / "splits.json").write_text(json.dumps(lists))
    folder_config = Config(dataset="folder", data_dir=str(root), cache_dir=str(tmp_path / "c"),
                           image_size=28, channels=1, invert_images=True, way=5,
                           eval_rotations="augment")
    dedicated = Config(dataset="omniglot", data_dir=omniglot_dir, data_source="npz", way=5)
    a = data_lib.split_images(folder_config, "val")
    b = data_lib.split_images(dedicated, "val")
    assert a.num_classes == b.num_classes == 400
    np.testing.assert_array_equal(a.images, b.images)
    for x, y in zip(next(iter(data_lib.eval_dataset(folder_config, "val", 6, 1))),
                    next(iter(data_lib.eval_dataset(dedicated, "val", 6, 1)))):
        np.testing.assert_array_equal(x.numpy(), y.numpy())


def test_mini_imagenet_sample_as_folders_gives_the_dedicated_loaders_tasks(mini_imagenet_dir,
                                                                           tmp_path):
    import csv
    root = tmp_path / "mini"
    for split in ("train", "val", "test"):
        with open(os.path.join(mini_imagenet_dir, f"{split}.csv")) as f:
            for row in csv.DictReader(f):
                target = root / split / row["label"] / row["filename"]
                target.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(os.path.join(mini_imagenet_dir, "images", row["filename"]), target)
    generic_config = Config(dataset="folder", data_dir=str(root), cache_dir=str(tmp_path / "c"),
                            image_size=84, channels=3, way=5, query=15)
    dedicated = Config(dataset="mini_imagenet", data_dir=mini_imagenet_dir, way=5, query=15)
    for split in ("train", "test"):
        a, b = (data_lib.split_images(c, split) for c in (generic_config, dedicated))
        assert [n.split("/")[1] for n in a.names] == list(b.names)
        np.testing.assert_array_equal(a.contiguous().images, b.images)
    for x, y in zip(next(iter(data_lib.train_dataset(generic_config, first_step=3))),
                    next(iter(data_lib.train_dataset(dedicated, first_step=3)))):
        np.testing.assert_array_equal(x.numpy(), y.numpy())


# -- the standard split files -------------------------------------------------------------------
@pytest.mark.parametrize("name,counts", [("cifar_fs", (64, 16, 20)), ("fc100", (60, 20, 20)),
                                         ("cub", (100, 50, 50))])
def test_shipped_split_files_have_the_published_counts_and_are_disjoint(name, counts):
    lists, _ = sources.read_split_file(name)
    assert tuple(len(lists[s]) for s in ("train", "val", "test")) == counts
    every = lists["train"] + lists["val"] + lists["test"]
    assert len(set(every)) == len(every)
    if name == "fc100":   # whole super-classes: 12/4/4 of CIFAR-100's 20, five classes each
        info = json.load(open(sources.split_file_path("fc100")))
        assert [len(info["superclasses"][s]) for s in ("train", "val", "test")] == [12, 4, 4]
        assert set(every) == set(sources.read_split_file("cifar_fs")[0]["train"] +
                                 sources.read_split_file("cifar_fs")[0]["val"] +
                                 sources.read_split_file("cifar_fs")[0]["test"])


def test_a_cifar_fs_folder_is_split_by_the_shipped_file_and_tiered_counts_are_checked(tmp_path):
    lists, _ = sources.read_split_file("cifar_fs")
    root = tmp_path / "cifar"
    for name in lists["train"] + lists["val"] + lists["test"]:
        for i in range(2):
            _write(f"{root}/data/{name}/{i}.png", np.full((4, 4, 3), i, np.uint8))
    loaded = generic.load(_config(root, tmp_path / "c", split_file="cifar_fs"))
    assert [loaded.splits[s].num_classes for s in ("train", "val", "test")] == [64, 16, 20]
    assert loaded.splits["test"].names[0] == "data/" + lists["test"][0]
    tiered = tmp_path / "tiered"
    for split, n in (("train", 3), ("val", 2), ("test", 2)):
        for k in range(n):
            _write(f"{tiered}/{split}/n0{k}/0.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match="has 3 classes, but tiered_imagenet says the standard "
                                        "split has 351"):
        generic.load(_config(tiered, tmp_path / "c", split_file="tiered_imagenet"))


def test_cub_images_are_cropped_to_their_bounding_boxes(tmp_path):
    root = tmp_path / "CUB_200_2011"
    lines, boxes = [], []
    for k in range(6):   # a 40x30 image whose box (x=10, y=5, 20x10) is white, the rest black
        image = np.zeros((30, 40, 3), np.uint8)
        image[5:15, 10:30] = 255
        name = f"{k + 1:03d}.Bird_{k}/img_{k}.jpg"
        _write(f"{root}/images/{name}", image)
        lines.append(f"{k + 1} {name}")
        boxes.append(f"{k + 1} 10.0 5.0 20.0 10.0")
    (root / "images.txt").write_text("\n".join(lines) + "\n")
    (root / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    config = _config(root / "images", tmp_path / "c", channels=3, image_size=8,
                     class_split=(2, 2, 2), crop_to_boxes=True)
    cropped = generic.load(config).splits["train"].contiguous().images
    whole = generic.load(config.replace(crop_to_boxes=False)).splits["train"].contiguous().images
    assert cropped.min() > 200 and whole.min() < 50   # only the box is left
    (root / "bounding_boxes.txt").write_text("\n".join(boxes[:-1]) + "\n")
    with pytest.raises(DataError, match="have no bounding box"):
        generic.load(config.replace(cache_dir=str(tmp_path / "c2")))


def test_ren_et_al_pickles_are_read_with_their_own_splits(tmp_path):
    import io
    import pickle
    root = tmp_path / "tiered"
    root.mkdir()
    for split, classes in (("train", 3), ("val", 2), ("test", 2)):
        labels = np.repeat(np.arange(classes), 3)[::-1].copy()   # out of class order
        pngs = []
        for label in labels:
            buffer = io.BytesIO()
            Image.fromarray(np.full((6, 6, 3), 40 * label + 1, np.uint8)).save(buffer, "PNG")
            pngs.append(np.frombuffer(buffer.getvalue(), np.uint8))
        with open(root / f"{split}_images_png.pkl", "wb") as f:
            pickle.dump(pngs, f)
        with open(root / f"{split}_labels.pkl", "wb") as f:
            pickle.dump({"label_specific": labels, "label_general": labels * 0,
                         "label_specific_str": [f"n{split}{k}" for k in range(classes)],
                         "label_general_str": ["all"]}, f)
    loaded = generic.load(_config(root, tmp_path / "c", image_size=6, channels=3))
    train = loaded.splits["train"]
    assert train.names == ("train/ntrain0", "train/ntrain1", "train/ntrain2")
    assert list(train.counts) == [3, 3, 3] and loaded.splits["val"].num_classes == 2
    for c in range(3):
        assert set(np.unique(train.images[train.starts[c]:train.starts[c] + 3])) == {40 * c + 1}
    (root / "val_labels.pkl").write_bytes(b"garbage")
    with pytest.raises(DataError, match="val_labels.pkl"):
        generic.load(_config(root, tmp_path / "c2", image_size=6, channels=3))


def test_cross_domain_test_data_take_the_networks_image_shape(tmp_path):
    config = Config(dataset="mini_imagenet", eval_dataset="folder", eval_data_dir=str(tmp_path),
                    eval_split_file="cub")
    test = data_lib.test_config(config)
    assert (test.dataset, test.data_dir, test.split_file, test.image_shape) == (
        "folder", str(tmp_path), "cub", (84, 84, 3))
    with pytest.raises(DataError, match=r"has \(84, 84, 3\) images but the network takes"):
        data_lib.test_config(Config(dataset="omniglot", eval_dataset="mini_imagenet"))
    from maml_tf.config import ConfigError
    with pytest.raises(ConfigError, match="set --eval_dataset too"):
        Config(dataset="omniglot", eval_data_dir="/x")


# -- whole runs -------------------------------------------------------------------------------
TINY = dict(way=3, shot=1, query=2, num_filters=4, meta_batch_size=2, num_iterations=2,
            val_tasks=3, eval_tasks=3, eval_every=2, checkpoint_every=1, log_every=1,
            jit_compile=False)


@pytest.mark.isolated
def test_python_data_trains_resumes_and_evaluates_only_with_the_same_data(tmp_path):
    from maml_tf import api
    rng = np.random.RandomState(0)
    images = rng.randint(0, 255, (12 * 5, 10, 10)).astype(np.uint8)
    labels = np.repeat(np.arange(12), 5)
    config = Config(dataset="python", class_split=(6, 3, 3), **TINY)
    workdir = str(tmp_path / "run")
    first = api.train(config, workdir, data=(images, labels))
    assert first["protocol"]["dataset"] == "python"
    saved = json.load(open(os.path.join(workdir, "config.json")))["data"]
    assert saved["dataset"] == "python" and saved["image_size"] == 10 and saved["channels"] == 1
    with pytest.raises(DataError, match="pass the same data again"):
        api.evaluate_workdir(workdir)
    with pytest.raises(DataError, match="The data differs from the data this run was trained on"):
        api.train(config.replace(num_iterations=3), workdir, data=(images[::-1], labels))
    again = api.evaluate_workdir(workdir, data=(images, labels))
    assert again["test"] == first["test"]   # the same fixed tasks, the same checkpoint
    resumed = api.train(config.replace(num_iterations=3), workdir, data=(images, labels))
    assert resumed["protocol"]["checkpoint_step"] == 3


@pytest.mark.isolated
def test_a_folder_run_resumes_bitwise_and_refuses_changed_images(tmp_path):
    import subprocess
    import sys
    root = tmp_path / "data"
    _ragged_folder(str(root), sizes=(4, 5, 6, 4, 5, 6, 4, 5, 6))
    base = [sys.executable, "-m", "maml_tf.train", "--dataset=folder", f"--data_dir={root}",
            f"--cache_dir={tmp_path / 'cache'}", "--image_size=8", "--channels=1",
            "--class_split=3,3,3"] + [f"--{k}={str(v).lower()}" for k, v in TINY.items()
                                      if k != "num_iterations"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}

    def run(workdir, iterations):
        return subprocess.run(base + [f"--workdir={workdir}", f"--num_iterations={iterations}"],
                              env=env, capture_output=True, text=True, timeout=600)

    # The uninterrupted run goes beside the interrupted one (each is mostly single-threaded
    # start-up and tracing); they share the cache, which runs may build at the same time.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as lane:
        straight = lane.submit(run, tmp_path / "straight", 4)
        for args in ((tmp_path / "split", 2), (tmp_path / "split", 4)):
            out = run(*args)
            assert out.returncode == 0, out.stderr[-3000:]
        out = straight.result()
        assert out.returncode == 0, out.stderr[-3000:]
    a, b = (json.load(open(tmp_path / w / "results.json"))["test"] for w in ("straight", "split"))
    assert a == b
    _write(f"{root}/a0/class0/img0.png", np.full((8, 8), 7, np.uint8))
    out = run(tmp_path / "split", 6)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "The data differs from the data this run was trained on" in out.stderr


@pytest.mark.isolated
def test_cross_domain_evaluation_of_a_trained_run(tmp_path):
    from maml_tf import api
    source, target = tmp_path / "source", tmp_path / "target"
    _ragged_folder(str(source), sizes=(4,) * 9)
    _ragged_folder(str(target), sizes=(5,) * 9, split_folders=True)
    config = _config(source, tmp_path / "cache", class_split=(3, 3, 3), **TINY)
    workdir = str(tmp_path / "run")
    api.train(config, workdir)
    out = api.evaluate_workdir(workdir, eval_dataset="folder", eval_data_dir=str(target))
    assert out["protocol"]["eval_dataset"] == "folder"
    assert out["protocol"]["eval_data_dir"] == str(target)
    names = sorted(os.listdir(workdir))
    assert any(n.endswith("-on-folder-target.json") for n in names), names
    from maml_tf import report, run_records
    text = report.table([run_records.read_run(workdir)])
    assert "tested on folder target" in text and "transductive, 2 queries per class |" in text
