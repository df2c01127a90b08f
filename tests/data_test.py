"""Data: episodes, sinusoid, Omniglot's three sources and splits, mini-ImageNet loaders."""

import io
import os
import pickle
import shutil
import zipfile

import numpy as np
import pytest
import tensorflow as tf

from maml_tf import data as data_lib
from maml_tf.data import few_shot, mini_imagenet, omniglot
from maml_tf.data.classes import ClassImages
from maml_tf.data.errors import DataError
from maml_tf.config import Config


def _omniglot_config(omniglot_dir, **kw):
    return Config.from_dict({"dataset": "omniglot", "data_dir": omniglot_dir, **kw})


# -- episodes -----------------------------------------------------------------------------
def test_sinusoid_episodes_have_documented_shapes_and_are_deterministic():
    config = Config.from_dict({"shot": 5, "query": 7, "meta_batch_size": 4})
    a = next(iter(data_lib.train_dataset(config)))
    b = next(iter(data_lib.train_dataset(config)))
    assert a.support_x.shape == (4, 5, 1) and a.query_y.shape == (4, 7, 1)
    np.testing.assert_array_equal(a.support_y.numpy(), b.support_y.numpy())
    assert np.all(np.abs(a.support_x.numpy()) <= 5)
    amp = np.abs(a.query_y.numpy()).max()
    assert 0 < amp <= 5


def test_training_resumes_on_exactly_the_tasks_it_would_have_seen():
    config = Config.from_dict({"meta_batch_size": 3})
    it = iter(data_lib.train_dataset(config))
    episodes = [next(it) for _ in range(3)]
    resumed = next(iter(data_lib.train_dataset(config, first_step=2)))
    np.testing.assert_array_equal(resumed.support_x.numpy(), episodes[2].support_x.numpy())


def test_few_shot_tasks_have_distinct_classes_and_permuted_labels():
    # Class c is a constant image of value c, so the class of every example is readable.
    images = ClassImages.from_grouped(np.broadcast_to(
        np.arange(30, dtype=np.uint8)[:, None, None, None, None], (30, 20, 4, 4, 1)).copy())
    first_class = []
    for i in range(40):
        sx, sy, qx, qy, classes = few_shot.sample_task(images, 7, tf.constant(i, tf.int64), 5, 2, 3)
        assert sx.shape == (10, 4, 4, 1) and qx.shape == (15, 4, 4, 1)
        cls_s = np.round(sx.numpy()[:, 0, 0, 0] * 255).astype(int)
        cls_q = np.round(qx.numpy()[:, 0, 0, 0] * 255).astype(int)
        assert len(set(cls_s)) == 5
        for label in range(5):   # one class per label, the same in support and query
            assert len(set(cls_s[sy.numpy() == label])) == 1
            assert set(cls_q[qy.numpy() == label]) == set(cls_s[sy.numpy() == label])
            # `classes` names the split-level class behind each label (pre-training reads it).
            assert set(cls_s[sy.numpy() == label]) == {int(classes.numpy()[label])}
        first_class.append(cls_s[sy.numpy() == 0][0])
    assert len(set(first_class)) > 10   # label 0 is a different class from task to task


def test_omniglot_episodes_come_from_one_split(omniglot_dir):
    config = _omniglot_config(omniglot_dir, way=5, shot=1, meta_batch_size=2)
    ep = next(iter(data_lib.eval_dataset(config, "test", 4)))
    assert ep.support_x.shape == (2, 5, 28, 28, 1) and ep.support_y.dtype == tf.int32
    x = ep.support_x.numpy()
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.mean() < 0.5   # ink = 1 on paper = 0


# -- Omniglot sources -----------------------------------------------------------------------
def _official_zip_from_npz(omniglot_dir, out_dir, chars=3):
    """Writes official-layout zips holding the first `chars` characters of each part."""
    from PIL import Image
    for part in omniglot.PARTS:
        images = np.load(os.path.join(omniglot_dir, part + ".npz"))["images"][:chars]
        with zipfile.ZipFile(os.path.join(out_dir, part + ".zip"), "w") as z:
            for c in range(chars):
                for d in range(20):
                    buf = io.BytesIO()
                    Image.fromarray(images[c, d].astype(np.uint8) * 255).convert("1").save(buf, "PNG")
                    name = f"{part}/Alphabet_{c % 2}/character{c + 1:02d}/{1000 + c:04d}_{d + 1:02d}.png"
                    z.writestr(name, buf.getvalue())


def test_official_zips_give_the_same_arrays_as_npz(omniglot_dir, tmp_path):
    _official_zip_from_npz(omniglot_dir, str(tmp_path))
    arrays = omniglot._from_official(str(tmp_path))
    for part in omniglot.PARTS:
        want = np.load(os.path.join(omniglot_dir, part + ".npz"))["images"][:3]
        np.testing.assert_array_equal(arrays[part], want)
    # Unzipped folders read the same.
    for part in omniglot.PARTS:
        zipfile.ZipFile(tmp_path / (part + ".zip")).extractall(tmp_path / "unzipped")
    folders = omniglot._from_official(str(tmp_path / "unzipped"))
    np.testing.assert_array_equal(folders["images_background"], arrays["images_background"])


def test_tfds_examples_give_the_same_arrays_as_npz(omniglot_dir):
    import tensorflow_datasets as tfds
    raw = {p: np.load(os.path.join(omniglot_dir, p + ".npz"))["images"][:4] for p in omniglot.PARTS}

    def as_dataset(self, split, **kwargs):
        images = raw["images_background" if split == "train" else "images_evaluation"]
        rgb = np.repeat((images.reshape(-1, 105, 105, 1) * 255).astype(np.uint8), 3, axis=-1)
        labels = np.repeat(np.arange(len(images)) + (0 if split == "train" else 964), 20)
        return tf.data.Dataset.from_tensor_slices({"image": rgb, "label": labels})

    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        arrays = omniglot.arrays_from_tfds(tfds.builder("omniglot"))
    for part in omniglot.PARTS:
        np.testing.assert_array_equal(arrays[part], raw[part])


def test_missing_source_fails_fast_listing_what_was_tried(tmp_path):
    with pytest.raises(DataError) as err:
        omniglot.load_raw(str(tmp_path / "empty"), "auto")
    text = str(err.value)
    for source in ("npz", "official", "tfds"):
        assert f"{source}:" in text
    assert "--data_dir" in text and "offline" in text


def test_corrupt_npz_is_named(omniglot_dir, tmp_path):
    for p in omniglot.PARTS:
        shutil.copy(os.path.join(omniglot_dir, p + ".npz"), tmp_path)
    path = tmp_path / "images_evaluation.npz"
    path.write_bytes(path.read_bytes()[:100000])   # truncated
    with pytest.raises(DataError, match="images_evaluation.npz is corrupt or truncated"):
        omniglot._from_npz(str(tmp_path))
    # With a SHA256SUMS file the truncation is caught by the checksum.
    shutil.copy(os.path.join(omniglot_dir, "SHA256SUMS"), tmp_path)
    with pytest.raises(DataError, match="does not match its SHA256SUMS"):
        omniglot._from_npz(str(tmp_path))


def test_wrong_image_shapes_are_refused(tmp_path):
    for p, n in omniglot.SIZES.items():
        np.savez(tmp_path / (p + ".npz"), images=np.ones((n, 20, 84, 84), bool))
    with pytest.raises(DataError, match=r"expected \(964, 20, 105, 105\)"):
        omniglot.load_raw(str(tmp_path), "npz")


@pytest.mark.parametrize("split, sizes", [("cbfinn", (1100, 100, 423)),
                                          ("vinyals", (1028, 172, 423)),
                                          ("lake", (864, 100, 659))])
def test_splits_are_disjoint_and_sized(split, sizes):
    idx = omniglot.split_indices(split)
    assert tuple(len(idx[s]) for s in ("train", "val", "test")) == sizes
    assert len(np.unique(np.concatenate(list(idx.values())))) == sum(sizes)


def test_rotations_make_four_classes(omniglot_dir):
    plain = omniglot.load_split(omniglot_dir, "npz", "cbfinn", "val", "none")
    rotated = omniglot.load_split(omniglot_dir, "npz", "cbfinn", "val", "augment")
    assert rotated.shape == (4 * plain.shape[0],) + plain.shape[1:]
    np.testing.assert_array_equal(rotated[4 * 7 + 1], np.rot90(plain[7], 1, axes=(1, 2)))


# -- mini-ImageNet --------------------------------------------------------------------------
def test_mini_imagenet_csv_layout_reads_the_shared_sample(mini_imagenet_dir):
    for split, classes in (("train", 64), ("val", 16), ("test", 20)):
        images = mini_imagenet.load_split(mini_imagenet_dir, split)
        assert images.shape == (classes, 20, 84, 84, 3) and images.dtype == np.uint8


def test_mini_imagenet_pickle_cache_equals_csv(mini_imagenet_dir, tmp_path):
    images = mini_imagenet.load_split(mini_imagenet_dir, "val")
    flat = images.reshape((-1, 84, 84, 3))
    class_dict = {f"n{c:08d}": list(range(c * 20, c * 20 + 20)) for c in range(images.shape[0])}
    with open(tmp_path / "mini-imagenet-cache-val.pkl", "wb") as f:
        pickle.dump({"image_data": flat, "class_dict": class_dict}, f)
    np.testing.assert_array_equal(mini_imagenet.load_split(str(tmp_path), "val"), images)


def test_mini_imagenet_missing_and_short_classes_are_clear_errors(mini_imagenet_dir, tmp_path):
    with pytest.raises(DataError, match="was not found"):
        mini_imagenet.load_split(str(tmp_path), "test")
    config = Config.from_dict({"dataset": "mini_imagenet", "data_dir": mini_imagenet_dir,
                               "shot": 5, "query": 16})
    with pytest.raises(DataError, match="too few for --way=5 with 5 shots"):
        data_lib.eval_dataset(config, "test", 2)


def test_input_pipelines_split_each_meta_batch_without_overlap():
    """Two workers (one pipeline each) see disjoint tasks whose union is one device's batch."""
    config = Config.from_dict({"meta_batch_size": 4})
    single = iter(data_lib.train_dataset(config))
    workers = [iter(data_lib.train_dataset(config, tf.distribute.InputContext(
        num_input_pipelines=2, input_pipeline_id=i, num_replicas_in_sync=2))) for i in range(2)]
    for _ in range(3):
        whole = next(single).support_y.numpy()
        parts = [next(w).support_y.numpy() for w in workers]
        assert all(p.shape[0] == 2 for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), whole)
        assert not np.array_equal(parts[0], parts[1])


def test_the_evaluation_batch_is_found_among_divisors_even_for_a_huge_meta_batch():
    import time
    t0 = time.perf_counter()
    assert data_lib.eval_batch_size(600, 10 ** 8) == 600   # was a loop over 10^8 integers
    assert time.perf_counter() - t0 < 1.0
    assert [data_lib.eval_batch_size(600, p) for p in (25, 32, 1)] == [25, 30, 1]
    assert data_lib.eval_batch_size(600, 7, multiple_of=2) == 6
