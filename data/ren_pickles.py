"""The pickled arrays of Ren et al. (2018), the usual distribution of tieredImageNet.

A folder with, per split ``s`` in train / val / test:

* ``s_labels.pkl``: a dict with ``label_specific`` (the class index of each image) and
  ``label_specific_str`` (the class names, ImageNet synsets), among others;
* ``s_images_png.pkl`` (a list of PNG-encoded images, one uint8 byte array each) or its
  decompressed form ``s_images.npz`` (``images`` uint8 ``[N, 84, 84, 3]``).

Read by ``--dataset=folder --data_dir=<that folder>``: the classes are ``s/<synset>`` and the
splits are the files'. Images are decoded into the cache of ``data/sources.py`` once.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Callable

import numpy as np

from maml_tf.data import folder
from maml_tf.data.errors import DataError
from maml_tf.data.rowfile import RowFile

SPLITS = ("train", "val", "test")


def present(root: str) -> bool:
    return bool(root) and all(os.path.exists(os.path.join(root, f"{s}_labels.pkl")) for s in SPLITS)


def files(root: str) -> list[str]:
    """The files that hold the data (for the cache key)."""
    out = []
    for s in SPLITS:
        out.append(os.path.join(root, f"{s}_labels.pkl"))
        npz = os.path.join(root, f"{s}_images.npz")
        out.append(npz if os.path.exists(npz) else os.path.join(root, f"{s}_images_png.pkl"))
    return out


def _load_pickle(path: str):
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"cannot read {path} ({type(e).__name__}: {e}); it must be the pickle "
                        "of Ren et al.'s tieredImageNet distribution.") from None


def labels(root: str, split: str) -> tuple[np.ndarray, list[str]]:
    """``(class index of each image, class names)`` of one split."""
    path = os.path.join(root, f"{split}_labels.pkl")
    data = _load_pickle(path)
    data = {(k.decode() if isinstance(k, bytes) else k): v for k, v in data.items()} \
        if isinstance(data, dict) else {}
    if "label_specific" not in data or "label_specific_str" not in data:
        raise DataError(f"{path} has no 'label_specific' / 'label_specific_str' (it has "
                        f"{sorted(data)}): not Ren et al.'s labels file.")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in data["label_specific_str"]]
    return np.asarray(data["label_specific"], np.int64), names


def images(root: str, split: str):
    """The images of one split: a uint8 array, or a list of PNG byte arrays."""
    npz = os.path.join(root, f"{split}_images.npz")
    if os.path.exists(npz):
        with np.load(npz, mmap_mode="r") as z:
            return z["images"]
    return _load_pickle(os.path.join(root, f"{split}_images_png.pkl"))


def decode(item, size: int, channels: int) -> np.ndarray:
    from PIL import Image
    if isinstance(item, np.ndarray) and item.ndim == 3:
        pixels = item
    else:
        try:
            with Image.open(io.BytesIO(np.asarray(item, np.uint8).tobytes())) as img:
                pixels = np.asarray(img.convert("RGB"))
        except Exception as e:   # Pillow raises many types
            raise DataError(f"an image of Ren et al.'s pickle could not be decoded ({e}).") from None
    return folder.resize(folder.to_channels(pixels, channels), size)


def build(root: str, size: int, channels: int):
    """A ``sources.cached`` builder: ``allocate -> (names, rows, class of each row)``."""
    def run(allocate: Callable[[int], RowFile]) -> tuple[list[str], RowFile, np.ndarray]:
        per_split = {s: labels(root, s) for s in SPLITS}
        rows = allocate(sum(len(v[0]) for v in per_split.values()))
        names: list[str] = []
        row_class = np.empty(len(rows), np.int64)
        at = 0
        for s in SPLITS:
            index, class_names = per_split[s]
            data = images(root, s)
            if len(data) != len(index):
                raise DataError(f"{root}: {s} has {len(data)} images but {len(index)} labels.")
            for c in np.unique(index):
                for i in np.flatnonzero(index == c):
                    rows[at] = decode(data[i], size, channels)
                    row_class[at] = len(names)
                    at += 1
                names.append(f"{s}/{class_names[c]}")
        return names, rows, row_class
    return run
