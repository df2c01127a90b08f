"""Image folders: a class is a folder that directly holds images, at any depth.

``scan(root)`` finds the classes (named by their path relative to ``root``, ``/``-separated,
in natural order: ``character2`` before ``character10``) and their images (natural order of
file names). ``decode(...)`` turns the files into uint8 ``[N, H, W, ch]`` rows in that order:

* mode: converted with Pillow to ``L`` (``--channels=1``) or ``RGB`` (``--channels=3``; alpha is
  dropped); ``--invert_images`` stores ``255 - pixel`` (ink on paper becomes the high values,
  as the Omniglot loader stores it);
* size: stretched to ``--image_size`` squared (as mini-ImageNet was made from ImageNet) with
  TensorFlow's ``area`` filter (box averaging, antialiased) when shrinking and ``bilinear``
  when enlarging, on [0, 1] floats rounded back to 0..255; images already of that size are
  kept exactly;
* bad files: a file with an image extension that cannot be decoded is named and skipped
  (``--strict_data`` refuses instead); other files (``README``, ``.DS_Store``) are ignored and
  counted.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
from typing import Iterable, Sequence

import numpy as np
from absl import logging

from maml_tf.data.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                    ".pgm")
# Bump when decoding changes, so that caches made by the old code are not reused.
DECODE_VERSION = 1


def natural_key(text: str) -> list:
    """Sorts ``a2`` before ``a10``: digit runs compare as numbers."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text) if t]


def scan(root: str) -> tuple[list[str], list[list[str]], int]:
    """``(class names, files of each class, ignored non-image files)`` under ``root``."""
    if not root:
        raise DataError("--dataset=folder needs --data_dir: the folder whose sub-folders hold "
                        "the images of each class.")
    if not os.path.isdir(root):
        raise DataError(f"--data_dir={root} does not exist or is not a folder; pass the folder "
                        "whose sub-folders hold the images of each class.")
    classes: dict[str, list[str]] = {}
    ignored = 0
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort(key=natural_key)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        images = sorted((f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)),
                        key=natural_key)
        ignored += sum(1 for f in files if not f.lower().endswith(IMAGE_EXTENSIONS)
                       and f not in ("splits.json",))
        if images:
            name = os.path.relpath(folder, root).replace(os.sep, "/")
            if name == ".":
                raise DataError(f"{root} holds images directly; put each class's images in a "
                                "folder of its own (the folder's name is the class).")
            classes[name] = [os.path.join(folder, f) for f in images]
    if not classes:
        raise DataError(f"--data_dir={root} holds no images (files ending in "
                        f"{', '.join(IMAGE_EXTENSIONS)}) in any sub-folder; each class is a "
                        "folder of images.")
    names = sorted(classes, key=natural_key)
    return names, [classes[n] for n in names], ignored


def fingerprint_files(files: Iterable[str]) -> list:
    """What identifies the files for a cache: each path with its size and modification
    time (content is not read, so a listing of 779k files takes seconds)."""
    out = []
    for path in files:
        st = os.stat(path)
        out.append([path, st.st_size, int(st.st_mtime_ns)])
    return out


def _read(path: str, channels: int, box=None):
    from PIL import Image
    try:
        with Image.open(path) as img:
            mode, size = img.mode, img.size
            if box is not None:   # (x, y, width, height) in pixels, as CUB's boxes
                x, y, w, h = box
                img = img.crop((int(round(x)), int(round(y)), int(round(x + w)), int(round(y + h))))
            pixels = np.asarray(img.convert("L" if channels == 1 else "RGB"))
    except Exception as e:   # Pillow raises many types (OSError, SyntaxError, ValueError...)
        return path, None, f"{type(e).__name__}: {e}"
    return path, pixels, (mode, size)


def decode(files: Sequence[str], image_size: int, channels: int, invert: bool, strict: bool,
           out, threads: int = 8, boxes: dict | None = None) -> np.ndarray:
    """Decodes ``files`` into the rows of ``out`` (uint8 ``[N, S, S, ch]``: an array or a
    ``RowFile``) and returns the bool ``[N]`` mask of the files that were read. boxes: ``{path:
    (x, y, width, height)}`` to crop each image to first (``read_boxes``)."""
    ok = np.zeros(len(files), bool)
    bad: list[str] = []
    modes: set = set()
    sizes: set = set()
    block = 256
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(files), block):
            for i, (path, pixels, info) in enumerate(
                    pool.map(lambda p: _read(p, channels, boxes[p] if boxes else None),
                             files[start:start + block]), start):
                if pixels is None:
                    if strict:
                        raise DataError(f"cannot read the image {path} ({info}); remove or "
                                        "replace it, or drop --strict_data to skip unreadable "
                                        "files.")
                    bad.append(f"{path} ({info})")
                    continue
                modes.add(info[0])
                sizes.add(info[1])
                out[i] = resize(pixels.reshape(pixels.shape[:2] + (channels,)), image_size,
                                invert)
                ok[i] = True
    if bad:
        logging.warning("%d unreadable image file(s) were skipped (pass --strict_data to refuse "
                        "them instead): %s%s", len(bad), "; ".join(bad[:5]),
                        " ..." if len(bad) > 5 else "")
    if len(sizes) > 1 or len(modes) > 1 or sizes - {(image_size, image_size)}:
        logging.info("The images have %d size(s) (%s) and %d mode(s) (%s): each was converted to "
                     "%s and resized to %dx%d.", len(sizes), _few(sizes), len(modes), _few(modes),
                     "grayscale" if channels == 1 else "RGB", image_size, image_size)
    return ok


def _few(values) -> str:
    items = sorted(str(v) for v in values)
    return ", ".join(items[:4]) + (" ..." if len(items) > 4 else "")


def resize(pixels: np.ndarray, size: int, invert: bool = False) -> np.ndarray:
    """uint8 ``[h, w, ch]`` -> ``[size, size, ch]`` by the rules of the module docstring."""
    import tensorflow as tf
    if invert:
        pixels = 255 - pixels
    h, w = pixels.shape[:2]
    if (h, w) == (size, size):
        return pixels
    method = "area" if h >= size and w >= size else "bilinear"
    small = tf.image.resize(tf.constant(pixels, tf.float32)[None] / 255.0, (size, size),
                            method=method, antialias=method == "bilinear").numpy()[0]
    return np.round(np.clip(small, 0.0, 1.0) * 255).astype(np.uint8)


def to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 ``[..., 1 or 3]`` -> ``[..., channels]``: gray to RGB by repetition, RGB to gray by
    ITU-R 601-2 luma (Pillow's ``convert("L")``)."""
    if images.shape[-1] == channels:
        return images
    if channels == 3:
        return np.repeat(images[..., :1], 3, axis=-1)
    rgb = images.astype(np.float64)
    gray = rgb[..., 0] * 299 / 1000 + rgb[..., 1] * 587 / 1000 + rgb[..., 2] * 114 / 1000
    return np.round(gray)[..., None].astype(np.uint8)


def read_boxes(root: str, files: Sequence[str]) -> dict:
    """CUB-200-2011's bounding boxes, ``{absolute path: (x, y, width, height)}`` for
    ``files``: ``images.txt`` (``<id> <class>/<file>``) and ``bounding_boxes.txt`` (``<id> x y
    width height``), in ``root`` or its parent (the release has them beside ``images/``)."""
    from maml_tf.data.errors import DataError
    for base in (root, os.path.dirname(root.rstrip("/"))):
        paths = [os.path.join(base, n) for n in ("images.txt", "bounding_boxes.txt")]
        if all(os.path.exists(p) for p in paths):
            break
    else:
        raise DataError(f"--crop_to_boxes needs CUB-200-2011's images.txt and "
                        f"bounding_boxes.txt in {root} or its parent folder; neither has both.")
    try:
        with open(paths[0]) as f:
            names = dict(line.split(maxsplit=1) for line in f if line.strip())
        with open(paths[1]) as f:
            boxes = {i: tuple(float(v) for v in rest.split()) for i, rest in
                     (line.split(maxsplit=1) for line in f if line.strip())}
    except ValueError as e:
        raise DataError(f"{paths[0]} or {paths[1]} is malformed ({e}): each line must be "
                        "'<id> <path>' and '<id> <x> <y> <width> <height>'.") from None
    by_path = {os.path.normpath(os.path.join(root, n.strip())): boxes.get(i)
               for i, n in names.items()}
    missing = [f for f in files if by_path.get(os.path.normpath(f)) is None]
    if missing:
        raise DataError(f"--crop_to_boxes: {len(missing)} image(s) have no bounding box in "
                        f"{paths[1]}, e.g. {missing[0]}; images.txt names them relative to "
                        f"{root}.")
    return {f: by_path[os.path.normpath(f)] for f in files}
