"""The generic image path: any class-structured image data as ``{split: ClassImages}``.

Three sources (``--dataset``), one result:

* ``folder``: an image folder tree under ``--data_dir`` (``data/folder.py``);
* ``tfds:<name>``: any TFDS image-classification data set (``data/tfds_source.py``);
* ``python``: arrays, file lists or a ``tf.data.Dataset`` given to ``maml_tf.train(...,
  data=...)`` (``data/python_source.py``).

Folders and TFDS data are decoded once into a cache (``--cache_dir``, default
``data/`` in ``$MAML_TF_CACHE``, default ``~/.cache/maml_tf``): one uint8 ``.npy`` file per source and
settings, read back row by row (``data/rowfile.py``) when larger than 1 GB, so a data set
larger than memory is sampled from disk without filling the training process.
The cache records what it was made from (every file's path, size and modification time, or
the TFDS version); when that changed it is rebuilt, never reused.

Splits are classes. The first of these decides them:

1. ``--split_file``: a JSON ``{"train": [...], "val": [...], "test": [...]}`` of class names;
2. ``--class_split=64,16,20``: a permutation of the classes (natural order) by
   ``numpy.random.RandomState(0)``, the same for every ``--seed``; the first 64 train, ...;
3. the data's own: ``train/``, ``val/`` (or ``validation/``) and ``test/`` top-level folders,
   a ``splits.json`` in ``--data_dir``, or a dict of splits passed from Python.

A class name in a split list matches a class's whole name or, if unique, its last folder.
Classes keep the order of the split list, which fixes the tasks of each ``(seed, split, i)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Any, Callable, Sequence

import numpy as np
from absl import logging

from maml_tf.data.classes import ClassImages
from maml_tf.data.errors import DataError
from maml_tf.data.rowfile import RowFile

SPLIT_NAMES = ("train", "val", "test")
FOLDER_SPLITS = {"train": "train", "val": "val", "validation": "val", "valid": "val",
                 "test": "test"}
# Cached arrays at most this large are read into memory; larger ones stay memory-mapped.
IN_MEMORY_BYTES = 1 << 30


def digest(value: Any) -> str:
    """A stable SHA-256 of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def cache_root(cache_dir: str) -> str:
    """``--cache_dir``, else ``data/`` in maml_tf's cache folder (``$MAML_TF_CACHE``, else
    ``$XDG_CACHE_HOME/maml_tf`` or ``~/.cache/maml_tf``, as ``maml_tf/__init__.py`` uses)."""
    if cache_dir:
        return cache_dir
    root = os.environ.get("MAML_TF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "maml_tf")
    return os.path.join(root, "data")


def cached(cache_dir: str, where: dict, what: dict, shape: Sequence[int],
           build: Callable[[Callable[[int], RowFile]], tuple[list[str], RowFile, np.ndarray]]
           ) -> tuple[ClassImages, str]:
    """The class images of a source, from its cache or built into it.

    where: identifies the source and settings (one cache folder per value); what: what the
      source held (file listing, version), the cache's key. shape: ``(H, W, ch)``.
    build: given ``allocate(n)``, which returns a uint8 ``[n, H, W, ch]`` ``RowFile`` on disk,
      fills one and returns ``(class names, it, class index of each row (-1: leave it out))``;
      the kept rows must be in class order.
    Returns the images and their ``content_digest``.
    """
    key = digest(what)
    folder = os.path.join(cache_root(cache_dir), digest(where)[:20])
    index_path, images_path = os.path.join(folder, "index.json"), os.path.join(folder, "images.npy")
    index = _read_index(index_path)
    if index is not None and index.get("key") == key and os.path.exists(images_path):
        try:
            return _open(images_path, index), index["content"]
        except (OSError, ValueError, KeyError, DataError) as e:
            logging.warning("The cache %s is damaged (%s): rebuilding it.", folder, e)
    elif index is not None:
        logging.warning("The cache %s was made from other data (files changed, added or removed "
                        "since): rebuilding it.", folder)
    os.makedirs(folder, exist_ok=True)
    if index is not None:   # no reader may pair the old index with the new images
        with contextlib.suppress(FileNotFoundError):   # another process rebuilding too
            os.remove(index_path)
    logging.info("Decoding %s into the cache %s ...", where.get("source"), folder)
    tmp = f"{images_path}.{os.getpid()}.tmp"

    def allocate(n: int) -> RowFile:
        return RowFile(tmp, (n,) + tuple(shape))

    try:
        names, rows, labels = build(allocate)
        starts, counts = _group(rows, labels, len(names))
        rows.flush()
        rows.close()
        os.replace(tmp, images_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    index = {"key": key, "where": where, "names": names, "starts": starts.tolist(),
             "counts": counts.tolist()}
    classes = _open(images_path, index)
    index["content"] = content_digest(classes)
    _write_json(index_path, index)
    return classes, index["content"]


def content_digest(classes: ClassImages) -> str:
    """A SHA-256 of the pixels, class sizes and names: the identity of the data a run
    trained on (the same after a folder is copied elsewhere, unlike the cache key)."""
    h = hashlib.sha256(repr((classes.names, classes.counts.tolist())).encode())
    for s, n in zip(classes.starts, classes.counts):
        for start in range(int(s), int(s + n), 4096):
            h.update(np.ascontiguousarray(classes.images[start:min(start + 4096, s + n)]).data)
    return h.hexdigest()


def _group(rows: RowFile, labels: np.ndarray, num_classes: int):
    """Closes the gaps of left-out rows (label -1) in place; the kept rows must already be in
    class order. A row only moves to a lower index, so none is overwritten before it is read."""
    labels = np.asarray(labels)
    keep = np.flatnonzero(labels >= 0)
    if np.any(np.diff(labels[keep]) < 0):
        raise DataError("internal error: a cache builder wrote rows out of class order")
    for dest, src in enumerate(keep):
        if dest != src:
            rows[dest] = rows[src]
    counts = np.bincount(labels[keep], minlength=num_classes).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return starts, counts


def _read_index(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, value: Any) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def _open(path: str, index: dict) -> ClassImages:
    images = RowFile(path)
    if images.nbytes <= IN_MEMORY_BYTES:
        images.close()
        images = np.load(path)
    return ClassImages(images, np.asarray(index["starts"], np.int64),
                       np.asarray(index["counts"], np.int64), tuple(index["names"]))


# -- splits ---------------------------------------------------------------------------------
def assign(classes: ClassImages, split_file: str, class_split: Sequence[int],
           own: dict[str, list[str]] | None, source: str) -> dict[str, ClassImages]:
    """``{train, val, test: ClassImages}`` by the first rule of the module docstring that
    applies; own: the data's own split lists (folders, splits.json, a dict from Python)."""
    counts = None
    if split_file:
        lists, counts = read_split_file(split_file)
        if lists is None:   # a file that only checks the data's own split
            if own is None:
                raise DataError(f"the split file {split_file} checks the data's own split (its "
                                "class counts) but the data has none: lay it out as train/, "
                                "val/ and test/ folders, or pass a split file with class lists.")
            lists = own
    elif class_split:
        return seeded_split(classes, class_split)
    elif own is not None:
        lists = own
    else:
        raise DataError(
            f"{source} has {classes.num_classes} classes but no split into train, val and test: "
            "pass --class_split=<train>,<val>,<test> (class counts, e.g. 64,16,20), "
            "--split_file=<file.json>, or lay the data out as train/, val/ and test/ folders "
            "(or a splits.json beside them).")
    out: dict[str, ClassImages] = {}
    seen: dict[int, str] = {}
    for split in SPLIT_NAMES:
        if split not in lists:
            raise DataError(f"the split lists of {source} have no {split!r} (they have "
                            f"{', '.join(sorted(lists)) or 'none'}); every run needs train, val "
                            "and test classes.")
        idx = match(classes, lists[split], f"the {split} split of {source}")
        for i in idx:
            if i in seen:
                raise DataError(f"class {classes.names[i]!r} is in both the {seen[i]} and the "
                                f"{split} split of {source}: splits must not share classes.")
            seen[i] = split
        out[split] = classes.select(idx)
        if counts and counts.get(split) not in (None, len(idx)):
            raise DataError(f"the {split} split of {source} has {len(idx)} classes, but "
                            f"{split_file} says the standard split has {counts[split]}: the data "
                            "is incomplete or not the data set the split file is for.")
    return out


def seeded_split(classes: ClassImages, counts: Sequence[int]) -> dict[str, ClassImages]:
    total = sum(counts)
    if total > classes.num_classes:
        raise DataError(f"--class_split={','.join(map(str, counts))} asks for {total} classes but "
                        f"the data has {classes.num_classes}; lower the counts.")
    if total < classes.num_classes:
        logging.warning("--class_split uses %d of the %d classes; the other %d are left out.",
                        total, classes.num_classes, classes.num_classes - total)
    order = np.random.RandomState(0).permutation(classes.num_classes)
    bounds = np.cumsum([0] + list(counts))
    return {s: classes.select(order[bounds[k]:bounds[k + 1]]) for k, s in enumerate(SPLIT_NAMES)}


def match(classes: ClassImages, names: Sequence[str], what: str) -> list[int]:
    """Indices of ``names``: whole class names, or their last folder where that is unique."""
    exact = {n: i for i, n in enumerate(classes.names)}
    last: dict[str, list[int]] = {}
    for i, n in enumerate(classes.names):
        last.setdefault(n.rsplit("/", 1)[-1], []).append(i)
    out, missing = [], []
    for name in names:
        name = str(name)
        if name in exact:
            out.append(exact[name])
        elif len(last.get(name, ())) == 1:
            out.append(last[name][0])
        else:
            missing.append(name)
    if missing:
        raise DataError(f"{len(missing)} class(es) of {what} are not classes of the data (or name "
                        f"more than one): {', '.join(map(repr, missing[:5]))}"
                        f"{' ...' if len(missing) > 5 else ''}. The data's classes include "
                        f"{', '.join(map(repr, classes.names[:3]))}.")
    return out


SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "splits")


def split_file_path(name: str) -> str:
    """A split file's path: a file, or the name of one shipped in ``data/splits/`` (e.g.
    ``cifar_fs``, ``fc100``, ``cub``, ``tiered_imagenet``)."""
    shipped = os.path.join(SHIPPED, f"{name}.json")
    if os.sep not in name and not name.endswith(".json") and os.path.exists(shipped):
        return shipped
    return name


def shipped_split_files() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(SHIPPED) if f.endswith(".json"))


def read_split_file(name: str) -> tuple[dict[str, list[str]] | None, dict[str, int] | None]:
    """``(class lists or None, class counts or None)`` of a split file (``split_file_path``):
    ``{"train": [...], "val": [...], "test": [...]}`` and/or ``{"counts": {...}}``."""
    path = split_file_path(name)
    try:
        with open(path) as f:
            lists = json.load(f)
    except OSError as e:
        raise DataError(f"cannot read the split file {path}: {e.strerror}. --split_file takes a "
                        "JSON file or the name of a shipped one: "
                        f"{', '.join(shipped_split_files())}.") from None
    except ValueError as e:
        raise DataError(f"the split file {path} is not valid JSON ({e}).") from None
    if not isinstance(lists, dict) or not all(isinstance(lists.get(k, []), list) for k in SPLIT_NAMES):
        raise DataError(f"the split file {path} must be a JSON object of lists of class names: "
                        '{"train": [...], "val": [...], "test": [...]}.')
    counts = lists.get("counts")
    found = {k: v for k, v in lists.items() if k in SPLIT_NAMES}
    return (found or None), (counts if isinstance(counts, dict) else None)


def folder_splits(names: Sequence[str], root: str) -> dict[str, list[str]] | None:
    """The data's own split lists: a ``splits.json`` in ``root``, or top-level ``train/``,
    ``val/`` and ``test/`` folders holding the classes."""
    path = os.path.join(root, "splits.json")
    if os.path.exists(path):
        return read_split_file(path)[0]
    tops = {n.split("/", 1)[0] for n in names}
    if "/" in "".join(names) and tops <= set(FOLDER_SPLITS):
        lists: dict[str, list[str]] = {}
        for n in names:
            lists.setdefault(FOLDER_SPLITS[n.split("/", 1)[0]], []).append(n)
        return lists
    return None
