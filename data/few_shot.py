"""N-way K-shot episodes sampled from the classes of one split (``data.classes.ClassImages``),
whatever the source; classes may differ in size.

Classes of a task are distinct, drawn without replacement; so are the images of a class.
With classes of equal size the draws are exactly those of the earlier sampler on a
``[C, D, H, W, ch]`` array, so existing runs see the same tasks.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from maml_tf.data.classes import ClassImages
from maml_tf.data.tasks import seeds_for

# Splits larger than this are read with a NumPy gather instead of a graph constant: a
# constant is copied into the graph (and TF's graphs are limited to 2 GB).
CONSTANT_BYTES = 256 << 20


def gather_fn(classes: ClassImages):
    """``rows int64 [...] -> uint8 [..., H, W, ch]`` over the images of ``classes``: a graph
    constant for small in-memory splits, a NumPy gather otherwise (large arrays, and the
    ``RowFile`` of a cache on disk, which reads only the rows a task needs)."""
    images = classes.images
    if isinstance(images, np.ndarray) and not isinstance(images, np.memmap) and \
            images.nbytes <= CONSTANT_BYTES:
        constant = tf.constant(images)
        return lambda rows: tf.gather(constant, rows)
    shape = tuple(images.shape[1:])

    def gather(rows):
        out = tf.numpy_function(lambda r: np.asarray(images[r.reshape(-1)]), [rows], tf.uint8,
                                stateful=False)
        return tf.reshape(out, list(rows.shape) + list(shape))
    return gather


def sample_task(classes: ClassImages, stream: int, index: tf.Tensor, way: int, shot: int,
                query: int, shuffle_support: bool = False, gather=None):
    """One task: support ``[way*shot, H, W, ch]`` float32 in [0, 1] with int32 labels
    ``[way*shot]`` (class-major), the query likewise with ``way*query`` examples, and the
    split-level class index of each label ``[way]`` (int32).

    The class order (hence the label of each class) is a fresh random permutation.
    shuffle_support: put the support set in a random order of its own (a sequence for
      MANN) instead of class-major; the classes, drawings and query are unchanged.
    gather: ``gather_fn(classes)``, made once per pipeline (None: made here).
    """
    gather = gather or gather_fn(classes)
    num_classes, drawings = classes.num_classes, int(classes.counts.max())
    seeds = seeds_for(stream, index, 2)
    chosen = tf.argsort(tf.random.stateless_uniform([num_classes], seeds[0]))[:way]
    keys = tf.random.stateless_uniform([way, drawings], seeds[1])
    if classes.counts.min() < drawings:
        # A smaller class's missing positions sort last (keys are below 1), so its picks are
        # a uniform draw without replacement from its own images.
        counts = tf.gather(tf.constant(classes.counts), chosen)
        keys = tf.where(tf.range(drawings, dtype=tf.int64)[None] < counts[:, None], keys, 2.0)
    picks = tf.cast(tf.argsort(keys, axis=1)[:, :shot + query], tf.int64)
    rows = tf.gather(tf.constant(classes.starts), chosen)[:, None] + picks
    x = tf.cast(gather(rows), tf.float32) / 255.0   # [way, K+Q, H, W, ch]
    labels = tf.repeat(tf.range(way, dtype=tf.int32)[:, None], shot + query, axis=1)

    def flat(t, n):
        return tf.reshape(t, [way * n] + list(t.shape[2:]))

    support_x, support_y = flat(x[:, :shot], shot), flat(labels[:, :shot], shot)
    if shuffle_support:
        # Folded from the drawings' seed, so the other draws of the task stay as they were.
        seed = tf.random.experimental.stateless_fold_in(seeds[1], 1)
        order = tf.argsort(tf.random.stateless_uniform([way * shot], seed))
        support_x, support_y = tf.gather(support_x, order), tf.gather(support_y, order)
    return (support_x, support_y, flat(x[:, shot:], query), flat(labels[:, shot:], query),
            tf.cast(chosen, tf.int32))
