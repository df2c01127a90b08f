"""Omniglot (Lake et al. 2015): 1623 characters x 20 drawings, three sources, three splits.

Sources, tried in this order by ``--data_source=auto`` (or chosen by name):

1. ``npz``: ``images_background.npz`` / ``images_evaluation.npz`` in ``--data_dir`` (bool
   ``images [C, 20, 105, 105]``, True = paper), checked against ``SHA256SUMS`` when present;
2. ``official``: ``images_background.zip`` / ``images_evaluation.zip`` of the official
   release in ``--data_dir``, or the same folders unzipped;
3. ``tfds``: TFDS ``omniglot`` (background = TFDS ``train``, evaluation = ``test``), from the
   TFDS data directory, downloading only when the machine is online.

Every source yields the same canonical arrays: characters in the order of the four-digit
character id of the official file names (``XXXX_YY.png``), drawings in order of ``YY``;
background then evaluation. Images are 105x105 binary, resized to 28x28 with TF's
``area`` filter (box averaging, antialiased), ink = 1, stored as uint8 (x255).

Splits of the 1623 characters (``--split``):

* ``cbfinn``: 1100 train / 100 val / 423 test, after a permutation by
  ``numpy.random.RandomState(1)`` of the canonical order (cbfinn/maml shuffled an
  ``os.listdir`` order with ``random.seed(1)``, which is not reproducible across machines);
* ``vinyals``: 1028 / 172 / 423 in canonical order, without shuffling (the sizes of Vinyals
  et al. 2016; the exact alphabet lists are not recoverable from the arrays);
* ``lake``: background characters 0..863 train, 864..963 val; all 659 evaluation test.

Training classes are multiplied by four with k*90 degree rotations (``--train_rotations``);
``--eval_rotations`` sets the same policy for validation and test.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import re
import socket
import zipfile

import numpy as np
from absl import logging

from maml_tf.data.errors import DataError

PARTS = ("images_background", "images_evaluation")
SIZES = {"images_background": 964, "images_evaluation": 659}
IMAGE_SIZE = 28
SPLITS = {"cbfinn": (1100, 100), "vinyals": (1028, 172)}
_NAME = re.compile(r"(\d{4})_(\d{2})\.png$")


# -- sources: each returns {part: bool [C, 20, 105, 105], True = paper} ----------------------
def _from_npz(data_dir: str) -> dict[str, np.ndarray]:
    paths = {p: os.path.join(data_dir, p + ".npz") for p in PARTS}
    missing = [p for p in paths.values() if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"no {', '.join(missing)}")
    _verify_checksums(data_dir, [os.path.basename(p) for p in paths.values()])
    out = {}
    for part, path in paths.items():
        try:
            with np.load(path) as z:
                out[part] = np.asarray(z["images"], dtype=bool)
        except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as e:
            raise DataError(f"{path} is corrupt or truncated ({type(e).__name__}: {e}); "
                            "replace it with a fresh copy.") from e
    return out


def _verify_checksums(data_dir: str, names: list[str]) -> None:
    sums_path = os.path.join(data_dir, "SHA256SUMS")
    if not os.path.exists(sums_path):
        logging.warning("%s has no SHA256SUMS beside %s: their checksums were not verified.",
                        data_dir, ", ".join(names))
        return
    expected = {}
    with open(sums_path) as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or not re.fullmatch(r"[0-9a-fA-F]{64}", fields[0]):
                raise DataError(f"{sums_path} line {number} is not '<sha256> <file name>' "
                                f"({line.strip()[:80]!r}); fix or remove that line.")
            expected[fields[1].lstrip("*")] = fields[0].lower()
    for name in names:
        if name not in expected:
            continue
        with open(os.path.join(data_dir, name), "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != expected[name]:
            raise DataError(f"{os.path.join(data_dir, name)} does not match its SHA256SUMS entry "
                            f"(got {digest[:12]}..., expected {expected[name][:12]}...): the file "
                            "is corrupt or truncated; replace it with a fresh copy.")


def _from_official(data_dir: str) -> dict[str, np.ndarray]:
    out = {}
    for part in PARTS:
        zip_path, folder = os.path.join(data_dir, part + ".zip"), os.path.join(data_dir, part)
        if os.path.isdir(folder):
            files = {os.path.join(r, f): None for r, _, fs in os.walk(folder) for f in fs}
            read = lambda path: open(path, "rb").read()
        elif os.path.exists(zip_path):
            try:
                archive = zipfile.ZipFile(zip_path)
            except zipfile.BadZipFile as e:
                raise DataError(f"{zip_path} is not a valid zip ({e}); download it again.") from e
            files = {n: None for n in archive.namelist()}
            read = archive.read
        else:
            raise FileNotFoundError(f"neither {zip_path} nor {folder}/")
        out[part] = _decode_pngs(files, read, part)
    return out


def _decode_pngs(names, read, part: str) -> np.ndarray:
    from PIL import Image
    found = sorted((m.group(1), m.group(2), n) for n in names if (m := _NAME.search(n)))
    if not found:
        raise DataError(f"{part}: no XXXX_YY.png drawings found; is this the official layout?")
    chars = sorted({c for c, _, _ in found})
    images = np.zeros((len(chars), 20, 105, 105), bool)
    index = {c: i for i, c in enumerate(chars)}
    counts = np.zeros(len(chars), int)
    for c, _, name in found:
        img = np.asarray(Image.open(io.BytesIO(read(name))).convert("L")) > 127
        if img.shape != (105, 105):
            raise DataError(f"{name} is {img.shape}, expected 105x105: not an Omniglot drawing.")
        i = index[c]
        if counts[i] >= 20:
            raise DataError(f"character {c} of {part} has more than 20 drawings.")
        images[i, counts[i]] = img
        counts[i] += 1
    if not np.all(counts == 20):
        raise DataError(f"{part}: characters {[chars[i] for i in np.where(counts != 20)[0][:5]]} "
                        "do not have 20 drawings each: the archive is incomplete.")
    return images


def _tfds_online(timeout: float = 3.0) -> bool:
    if os.environ.get("MAML_TF_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("raw.githubusercontent.com", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _from_tfds(data_dir: str) -> dict[str, np.ndarray]:
    import tensorflow_datasets as tfds
    builder = tfds.builder("omniglot", data_dir=data_dir or None)
    if not os.path.isdir(builder.data_dir) or not os.path.exists(
            os.path.join(builder.data_dir, "dataset_info.json")):
        # TFDS retries a download for minutes when offline: look before we leap.
        if not _tfds_online():
            raise FileNotFoundError(f"TFDS omniglot is not prepared in {builder.data_dir} and "
                                    "this machine is offline")
        builder.download_and_prepare()
    return arrays_from_tfds(builder)


def arrays_from_tfds(builder) -> dict[str, np.ndarray]:
    """Canonical arrays from a TFDS omniglot builder (``train`` = background)."""
    out = {}
    for part, split in zip(PARTS, ("train", "test")):
        by_label: dict[int, list[np.ndarray]] = {}
        for ex in builder.as_dataset(split=split, shuffle_files=False).as_numpy_iterator():
            by_label.setdefault(int(ex["label"]), []).append(ex["image"][..., 0] > 127)
        labels = sorted(by_label)
        if any(len(by_label[c]) != 20 for c in labels):
            raise DataError(f"TFDS omniglot {split}: a character does not have 20 drawings.")
        out[part] = np.stack([np.stack(by_label[c]) for c in labels])
    return out


SOURCES = {"npz": _from_npz, "official": _from_official, "tfds": _from_tfds}


def default_data_dir(data_dir: str) -> str:
    return data_dir or os.environ.get("MAML_TF_DATA_DIR", "")


@functools.lru_cache(maxsize=4)
def load_raw(data_dir: str, source: str = "auto") -> dict[str, np.ndarray]:
    """``{part: bool [C, 20, 105, 105]}`` from the first source that has the data."""
    data_dir = default_data_dir(data_dir)
    order = list(SOURCES) if source == "auto" else [source]
    tried = []
    for name in order:
        if name != "tfds" and not data_dir:
            tried.append(f"{name}: no --data_dir (nor $MAML_TF_DATA_DIR) given")
            continue
        try:
            arrays = SOURCES[name](data_dir)
        except FileNotFoundError as e:
            tried.append(f"{name}: {e}")
            continue
        _check_shapes(arrays, name)
        return arrays
    raise DataError(
        "Omniglot was not found. Tried, in order:\n  - " + "\n  - ".join(tried) +
        "\nFix: pass --data_dir=<dir> holding images_background.npz and images_evaluation.npz "
        "(or the official images_background.zip and images_evaluation.zip), or run once online "
        "so that TFDS can download 'omniglot'.")


def _check_shapes(arrays: dict[str, np.ndarray], source: str) -> None:
    for part, n in SIZES.items():
        shape = arrays[part].shape
        if shape != (n, 20, 105, 105):
            raise DataError(f"Omniglot {part} from {source} has shape {shape}, expected "
                            f"({n}, 20, 105, 105): the file is not the full official data.")


def to_small(images: np.ndarray) -> np.ndarray:
    """bool ``[..., 105, 105]`` (True = paper) -> uint8 ``[..., 28, 28, 1]`` ink in 0..255."""
    import tensorflow as tf
    lead = images.shape[:-2]
    flat = images.reshape((-1, 105, 105, 1))
    out = np.empty((len(flat), IMAGE_SIZE, IMAGE_SIZE, 1), np.uint8)
    # In blocks: all 32,460 images at once in float32 took 2.5 GB of peak memory.
    for start in range(0, len(flat), 2048):
        ink = tf.constant(1.0 - flat[start:start + 2048].astype(np.float32))
        small = tf.image.resize(ink, (IMAGE_SIZE, IMAGE_SIZE), method="area").numpy()
        out[start:start + 2048] = np.round(small * 255).astype(np.uint8)
    return out.reshape(lead + (IMAGE_SIZE, IMAGE_SIZE, 1))


@functools.lru_cache(maxsize=4)
def load_all(data_dir: str, source: str = "auto") -> np.ndarray:
    """uint8 ``[1623, 20, 28, 28, 1]``: background then evaluation characters."""
    raw = load_raw(data_dir, source)
    return np.concatenate([to_small(raw[p]) for p in PARTS])


def split_indices(split: str) -> dict[str, np.ndarray]:
    """Character indices (into ``load_all``) of each of train / val / test."""
    n = sum(SIZES.values())
    if split == "lake":
        bg = SIZES["images_background"]
        return {"train": np.arange(0, bg - 100), "val": np.arange(bg - 100, bg),
                "test": np.arange(bg, n)}
    train, val = SPLITS[split]
    order = np.random.RandomState(1).permutation(n) if split == "cbfinn" else np.arange(n)
    return {"train": order[:train], "val": order[train:train + val], "test": order[train + val:]}


def load_split(data_dir: str, source: str, split_name: str, split: str,
               rotations: str) -> np.ndarray:
    """uint8 ``[C', 20, 28, 28, 1]`` classes of one split; with ``rotations='augment'``,
    C' = 4C and class ``4c + k`` is class ``c`` rotated by ``k * 90`` degrees."""
    images = load_all(data_dir, source)[split_indices(split_name)[split]]
    if rotations == "augment":
        images = np.stack([np.rot90(images, k, axes=(2, 3)) for k in range(4)], axis=1)
        images = images.reshape((-1,) + images.shape[2:])
    return np.ascontiguousarray(images)
