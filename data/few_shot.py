"""N-way K-shot episodes sampled from an in-memory image array.

The array ``images`` is uint8 ``[C, D, H, W, ch]``: D drawings of each of C classes of one
split (rotated Omniglot copies count as classes of their own). Classes of a task are
distinct, drawn without replacement; so are the drawings of a class.
"""

from __future__ import annotations

import tensorflow as tf

from maml_tf.data.tasks import seeds_for


def sample_task(images: tf.Tensor, stream: int, index: tf.Tensor, way: int, shot: int,
                query: int, shuffle_support: bool = False):
    """One task: support ``[way*shot, H, W, ch]`` float32 in [0, 1] with int32 labels
    ``[way*shot]`` (class-major), the query likewise with ``way*query`` examples, and the
    split-level class index of each label ``[way]`` (int32).

    The class order (hence the label of each class) is a fresh random permutation.
    shuffle_support: put the support set in a random order of its own (a sequence for
      MANN) instead of class-major; the classes, drawings and query are unchanged.
    """
    num_classes, drawings = images.shape[0], images.shape[1]
    seeds = seeds_for(stream, index, 2)
    classes = tf.argsort(tf.random.stateless_uniform([num_classes], seeds[0]))[:way]
    picks = tf.argsort(tf.random.stateless_uniform([way, drawings], seeds[1]), axis=1)
    picks = picks[:, :shot + query]
    idx = tf.stack([tf.repeat(classes[:, None], shot + query, axis=1), picks], axis=-1)
    x = tf.cast(tf.gather_nd(images, idx), tf.float32) / 255.0   # [way, K+Q, H, W, ch]
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
            tf.cast(classes, tf.int32))
