"""Data passed from Python: ``maml_tf.train(config, workdir, data=...)``.

``data`` may be

* ``(images, labels)``: images ``[N, H, W]`` or ``[N, H, W, ch]`` (uint8 0..255, bool, or
  floats in [0, 1]) and one label per image (any values; classes are the sorted distinct
  labels);
* ``(paths, labels)``: image files and their labels, decoded as ``data/folder.py`` does;
* a ``tf.data.Dataset`` of ``(image, label)`` pairs or of dicts with ``image`` and
  ``--label_key`` (finite, and in a fixed order: it is read once);
* a ``ClassImages``;
* a dict ``{"train": ..., "val": ..., "test": ...}`` of any of these: the splits (classes of
  different splits are different classes even where their labels are equal).

Images keep their size when they all share one square size and ``--image_size`` is 0;
otherwise they are resized to ``--image_size`` (84 by default) with the filter of
``data/folder.py``. ``--channels`` converts (gray to RGB by repetition, RGB to gray with
Pillow's weights); 0 keeps the data's own.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from maml_tf.data import folder, sources
from maml_tf.data.classes import ClassImages
from maml_tf.data.errors import DataError

SPLIT_NAMES = ("train", "val", "test")


@dataclasses.dataclass(frozen=True, eq=False)
class PythonData:
    """Python data read once: all classes, the data's own split lists (or None), and a
    fingerprint of the content."""
    classes: ClassImages
    own: dict[str, list[str]] | None
    fingerprint: str


def prepare(data, image_size: int = 0, channels: int = 0, label_key: str = "label",
            strict: bool = False) -> PythonData:
    """Reads ``data`` (see the module docstring) into uint8 class images."""
    if isinstance(data, PythonData):
        return data
    if isinstance(data, dict) and data and set(data) <= set(SPLIT_NAMES):
        parts = {s: _classes(v, image_size, channels, label_key, strict, f"data[{s!r}]")
                 for s, v in data.items()}
        shapes = {p.image_shape for p in parts.values()}
        if len(shapes) > 1:
            sizes = {p.image_shape[0] for p in parts.values()}
            size = image_size or (sizes.pop() if len(sizes) == 1 else 84)
            ch = channels or max(p.image_shape[2] for p in parts.values())
            parts = {s: _classes(v, size, ch, label_key, strict, f"data[{s!r}]")
                     for s, v in data.items()}
        own = {s: [f"{s}/{n}" for n in p.names] for s, p in parts.items()}
        images = np.concatenate([p.images for p in parts.values()])
        counts = np.concatenate([p.counts for p in parts.values()])
        classes = ClassImages(images, np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64),
                              counts.astype(np.int64), tuple(n for v in own.values() for n in v))
    elif isinstance(data, dict):
        raise DataError(f"data= as a dict must be the splits {{'train', 'val', 'test'}}: got the "
                        f"keys {sorted(map(str, data))}.")
    else:
        classes, own = _classes(data, image_size, channels, label_key, strict, "data"), None
    # Chunked (a ClassImages may be a RowFile larger than memory).
    content = sources.content_digest(classes)
    return PythonData(classes, own, hashlib.sha256(repr((content, own)).encode()).hexdigest())


def load(data, config):
    """``(classes, own splits, fingerprint, {})`` of ``data`` for ``data/generic.py``."""
    p = prepare(data, config.image_size, config.channels, config.label_key, config.strict_data)
    return p.classes, p.own, p.fingerprint, {}


def _classes(data, size: int, channels: int, label_key: str, strict: bool,
             what: str) -> ClassImages:
    if isinstance(data, ClassImages):
        return _convert_classes(data, size, channels)
    import tensorflow as tf
    if isinstance(data, tf.data.Dataset):
        images, labels = _from_dataset(data, label_key, what)
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        images, labels = data
        if isinstance(images, (list, tuple)) and images and isinstance(images[0], str):
            return _from_files(list(images), labels, size, channels, strict, what)
        images = np.asarray(images)
    else:
        raise DataError(f"{what} must be (images, labels), (file paths, labels), a "
                        "tf.data.Dataset of (image, label), or a dict of such splits; got "
                        f"{type(data).__name__}.")
    labels = np.asarray(labels)
    if isinstance(images, list):   # ragged sizes, from a tf.data.Dataset
        target = size or 84
        images = np.stack([_fit(_uint8(x, what), target, channels or x.shape[-1]) for x in images])
    else:
        images = _uint8(images, what)
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise DataError(f"{what}: images must be [N, H, W] or [N, H, W, 1 or 3], got "
                            f"{list(images.shape)}.")
        square = images.shape[1] == images.shape[2]
        target = size or (images.shape[1] if square else 84)
        images = _fit_all(images, target, channels or images.shape[-1])
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{what}: {len(images)} images but labels of shape {list(labels.shape)}; "
                        "give one label per image.")
    return ClassImages.from_labelled(images, labels)


def _from_dataset(ds, label_key: str, what: str):
    images, labels = [], []
    for element in ds.as_numpy_iterator():
        if isinstance(element, dict):
            if label_key not in element or "image" not in element:
                raise DataError(f"{what}: a dict element needs 'image' and the label key "
                                f"{label_key!r} (--label_key); it has {sorted(element)}.")
            image, label = element["image"], element[label_key]
        elif isinstance(element, tuple) and len(element) == 2:
            image, label = element
        else:
            raise DataError(f"{what}: a tf.data.Dataset element must be (image, label) or a dict; "
                            f"got {type(element).__name__}.")
        images.append(np.asarray(image) if np.ndim(image) == 3 else np.asarray(image)[..., None])
        labels.append(label.decode() if isinstance(label, bytes) else label)
    if not images:
        raise DataError(f"{what}: the tf.data.Dataset is empty.")
    if len({x.shape for x in images}) == 1:
        return np.stack(images), np.asarray(labels)
    return images, np.asarray(labels)


def _from_files(paths, labels, size: int, channels: int, strict: bool, what: str) -> ClassImages:
    labels = np.asarray(labels)
    if len(labels) != len(paths):
        raise DataError(f"{what}: {len(paths)} files but {len(labels)} labels.")
    size, channels = size or 84, channels or 3
    rows = np.zeros((len(paths), size, size, channels), np.uint8)
    ok = folder.decode(paths, size, channels, False, strict, rows)
    return ClassImages.from_labelled(rows[ok], labels[ok])


def _uint8(images: np.ndarray, what: str) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    if images.dtype == bool:
        return images.astype(np.uint8) * 255
    if np.issubdtype(images.dtype, np.floating):
        if images.size and not (np.isfinite(images).all() and images.min() >= 0 and
                                images.max() <= 1):
            raise DataError(f"{what}: float images must lie in [0, 1] (got "
                            f"{np.nanmin(images):.3g}..{np.nanmax(images):.3g}, or non-finite "
                            "values); scale them, or pass uint8 0..255.")
        return np.round(images * 255).astype(np.uint8)
    if np.issubdtype(images.dtype, np.integer):
        if images.size and (images.min() < 0 or images.max() > 255):
            raise DataError(f"{what}: integer images must lie in 0..255.")
        return images.astype(np.uint8)
    raise DataError(f"{what}: images of dtype {images.dtype} are not pixels.")


def _fit(image: np.ndarray, size: int, channels: int) -> np.ndarray:
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] != channels:
        image = folder.to_channels(image[None], channels)[0]
    return folder.resize(image, size)


def _fit_all(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    if images.shape[-1] != channels:
        images = folder.to_channels(images, channels)
    if images.shape[1:3] == (size, size):
        return images
    return np.stack([_fit(x, size, channels) for x in images])


def _convert_classes(classes: ClassImages, size: int, channels: int) -> ClassImages:
    h, _, ch = classes.image_shape
    if (size in (0, h)) and (channels in (0, ch)):
        return classes
    compact = classes.contiguous()
    return ClassImages(_fit_all(np.asarray(compact.images), size or h, channels or ch),
                       compact.starts, compact.counts, compact.names)
