"""``ClassImages``: the images of one split, grouped by class, classes of any size.

Every image source (Omniglot, mini-ImageNet, an image folder, TFDS, arrays or a
``tf.data.Dataset`` passed from Python, a memory-mapped cache) ends as one ``ClassImages``
per split, and one sampler (``data/few_shot.py``) draws tasks from all of them.

The images are one uint8 array ``[N, H, W, ch]`` (in memory, or a ``numpy.memmap`` of a
cache file for data larger than memory); class ``c`` is the run of rows
``starts[c] .. starts[c] + counts[c] - 1``. Choosing classes (a split, leaving small classes
out) only chooses runs: the images are never copied.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from maml_tf.data.errors import DataError


@dataclasses.dataclass(frozen=True, eq=False)
class ClassImages:
    """images: uint8 ``[N, H, W, ch]``; starts, counts: int64 ``[C]``, class ``c`` is
    ``images[starts[c]:starts[c] + counts[c]]``; names: the ``C`` class names (for split.json
    and messages)."""
    images: np.ndarray
    starts: np.ndarray
    counts: np.ndarray
    names: tuple[str, ...]

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise DataError(f"class images must be uint8 [N, H, W, ch], got {self.images.dtype} "
                            f"{list(self.images.shape)}")
        if not len(self.starts) == len(self.counts) == len(self.names):
            raise DataError("class starts, counts and names differ in length")
        if len(self.starts) and (self.starts.min() < 0 or
                                 (self.starts + self.counts).max() > len(self.images)):
            raise DataError("a class's rows lie outside the images")

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.images.shape[1:])   # type: ignore[return-value]

    @classmethod
    def from_grouped(cls, images: np.ndarray, names: Sequence[str] | None = None) -> "ClassImages":
        """From uint8 ``[C, D, H, W, ch]`` (D images of each of C classes)."""
        c, d = images.shape[:2]
        names = tuple(names) if names is not None else tuple(str(i) for i in range(c))
        return cls(np.ascontiguousarray(images).reshape((c * d,) + images.shape[2:]),
                   np.arange(c, dtype=np.int64) * d, np.full(c, d, np.int64), names)

    @classmethod
    def from_labelled(cls, images: np.ndarray, labels: np.ndarray,
                      names: Sequence[str] | None = None) -> "ClassImages":
        """From uint8 ``[N, H, W, ch]`` with a label per image (any hashable values); classes
        are the sorted distinct labels, and images keep their order within a class."""
        labels = np.asarray(labels)
        if len(labels) != len(images):
            raise DataError(f"{len(images)} images but {len(labels)} labels: give one label per "
                            "image.")
        classes, inverse = np.unique(labels, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        counts = np.bincount(inverse, minlength=len(classes)).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        names = tuple(names) if names is not None else tuple(str(c) for c in classes)
        return cls(np.ascontiguousarray(images[order]), starts, counts, names)

    def select(self, classes: Sequence[int]) -> "ClassImages":
        """The classes ``classes`` (indices, in that order), sharing the images."""
        idx = np.asarray([int(c) for c in classes], np.int64)
        return ClassImages(self.images, self.starts[idx], self.counts[idx],
                           tuple(self.names[c] for c in idx))

    def rotated(self) -> "ClassImages":
        """Four classes per class, copied into memory: class ``4c + k`` is class ``c`` rotated by
        ``k * 90`` degrees (the Omniglot augmentation of Santoro et al. 2016)."""
        parts, names = [], []
        for c in range(self.num_classes):
            block = self.images[self.starts[c]:self.starts[c] + self.counts[c]]
            for k in range(4):
                parts.append(np.rot90(block, k, axes=(1, 2)))
                names.append(f"{self.names[c]}@rot{90 * k}")
        counts = np.repeat(self.counts, 4)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        images = np.concatenate(parts) if parts else self.images[:0]
        return ClassImages(np.ascontiguousarray(images), starts, counts.astype(np.int64),
                           tuple(names))

    def without_small(self, minimum: int) -> tuple["ClassImages", list[str]]:
        """The classes with at least ``minimum`` images, and the names of those left out."""
        keep = [c for c in range(self.num_classes) if self.counts[c] >= minimum]
        if len(keep) == self.num_classes:
            return self, []
        dropped = [self.names[c] for c in range(self.num_classes) if self.counts[c] < minimum]
        return self.select(keep), dropped

    def contiguous(self) -> "ClassImages":
        """The same classes with only their own rows, in memory (for a compact constant)."""
        if self.num_classes == 0:
            return ClassImages(self.images[:0], self.starts, self.counts, self.names)
        rows = np.concatenate([np.arange(s, s + n) for s, n in zip(self.starts, self.counts)])
        if len(rows) == len(self.images) and np.array_equal(rows, np.arange(len(rows))):
            return self
        starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        return ClassImages(np.ascontiguousarray(self.images[rows]), starts, self.counts,
                           self.names)
