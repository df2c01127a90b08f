"""Loads a generic image source (``--dataset=folder``, ``tfds:<name>``, ``python``) as its
three splits of ``ClassImages``, with a description for the workdir's ``split.json``; see
``data/sources.py`` for the cache and the split rules."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from absl import logging

from maml_tf.data import folder, python_source, ren_pickles, sources, tfds_source
from maml_tf.data.classes import ClassImages
from maml_tf.data.errors import DataError


@dataclasses.dataclass(frozen=True, eq=False)
class GenericData:
    """splits: ``{train, val, test: ClassImages}``; fingerprint: identifies what the data held
    (a changed folder or different arrays give another); description: for split.json."""
    splits: dict[str, ClassImages]
    fingerprint: str
    description: dict


def load(config, data=None) -> GenericData:
    """The splits of ``config.dataset``; data: what was passed as ``maml_tf.train(...,
    data=...)`` (needed for ``--dataset=python``)."""
    if config.dataset == "python":
        if data is None:
            raise DataError(
                "This run's data was passed from Python (maml_tf.train(config, workdir, data=...)) "
                "and is not stored in the workdir: pass the same data again, e.g. "
                "maml_tf.train(config, workdir, data=(images, labels)) to resume or "
                "maml_tf.evaluate_workdir(workdir, data=(images, labels)) to evaluate. Different "
                "data is refused (its fingerprint is in split.json).")
        return _finish(config, *python_source.load(data, config))
    if data is not None:
        raise DataError(f"data= was given with --dataset={config.dataset}; data passed from "
                        "Python is --dataset=python (maml_tf.train sets it when data= is given).")
    if config.dataset.startswith("tfds:"):
        return _finish(config, *tfds_source.load(config))
    return _finish(config, *_folder(config))


def _folder(config):
    root = os.path.abspath(config.data_dir) if config.data_dir else ""
    if ren_pickles.present(root):
        return _ren_pickles(config, root)
    names, files, ignored = folder.scan(root)
    if ignored:
        logging.info("%s: %d file(s) that are not images (by their extension) were ignored.",
                     root, ignored)
    size, _, channels = config.image_shape
    flat = [f for fs in files for f in fs]
    row_class = np.repeat(np.arange(len(names)), [len(fs) for fs in files])
    boxes = folder.read_boxes(root, flat) if config.crop_to_boxes else None
    where = {"source": f"folder {root}", "size": size, "channels": channels,
             "invert": config.invert_images, "strict": config.strict_data,
             "boxes": config.crop_to_boxes, "decode": folder.DECODE_VERSION}
    # The key leaves the folder's location out: a moved folder is still the same data.
    what = {**{k: v for k, v in where.items() if k != "source"},
            "files": [[os.path.relpath(p, root), n, t] for p, n, t in folder.fingerprint_files(flat)],
            "box_values": sorted(boxes.values()) if boxes else None}

    def build(allocate):
        rows = allocate(len(flat))
        ok = folder.decode(flat, size, channels, config.invert_images, config.strict_data, rows,
                           boxes=boxes)
        return names, rows, np.where(ok, row_class, -1)

    classes, key = sources.cached(config.cache_dir, where, what, (size, size, channels), build)
    own = sources.folder_splits(names, root)
    return classes, own, key, {"data_dir": root}


def _ren_pickles(config, root: str):
    size, _, channels = config.image_shape
    where = {"source": f"ren pickles {root}", "size": size, "channels": channels,
             "decode": folder.DECODE_VERSION}
    what = {**{k: v for k, v in where.items() if k != "source"},
            "files": [[os.path.basename(p), n, t]
                      for p, n, t in folder.fingerprint_files(ren_pickles.files(root))]}
    classes, key = sources.cached(config.cache_dir, where, what, (size, size, channels),
                                  ren_pickles.build(root, size, channels))
    own: dict[str, list[str]] = {}
    for name in classes.names:
        own.setdefault(name.split("/", 1)[0], []).append(name)
    return classes, own, key, {"data_dir": root, "layout": "Ren et al. pickles"}


def _finish(config, classes: ClassImages, own, key: str, extra: dict) -> GenericData:
    if classes.image_shape != tuple(config.image_shape):
        raise DataError(f"the data's images are {classes.image_shape} but the run expects "
                        f"{tuple(config.image_shape)} (--image_size, --channels): pass matching "
                        "values, or leave them at 0 for the data's own.")
    source = extra.get("data_dir") or config.dataset
    splits = sources.assign(classes, config.split_file, config.class_split, own, source)
    description = {"dataset": config.dataset, **extra, "fingerprint": key,
                   "image_shape": list(classes.image_shape),
                   "split_rule": ("split_file " + config.split_file if config.split_file else
                                  "class_split " + ",".join(map(str, config.class_split))
                                  if config.class_split else "the data's own"),
                   **{s: list(c.names) for s, c in splits.items()},
                   "images_per_class": {s: [int(n) for n in c.counts] for s, c in splits.items()}}
    return GenericData(splits, key, description)
