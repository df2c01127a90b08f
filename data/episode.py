"""The ``Episode``: a meta-batch of few-shot tasks, with a leading task axis.

For N-way K-shot classification with Q queries per class and T tasks:

* ``support_x``: float ``[T, N*K, H, W, C]``; ``support_y``: int32 ``[T, N*K]`` in 0..N-1
* ``query_x``: float ``[T, N*Q, H, W, C]``; ``query_y``: int32 ``[T, N*Q]``

For sinusoid regression with K support and Q query points:

* ``support_x``, ``support_y``: float ``[T, K, 1]``; ``query_x``, ``query_y``: ``[T, Q, 1]``

Labels are permuted independently for every task, so no output unit means one class.
For classification the pipelines also give ``classes``: int32 ``[T, N]``, the split-level
index of the class behind each label (label ``j`` of task ``t`` is class ``classes[t, j]``
of the split, rotated copies counting as classes). Only the pre-training baseline reads it;
it is None for sinusoid and may be left out of hand-built episodes.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf


class Episode(NamedTuple):
    support_x: tf.Tensor
    support_y: tf.Tensor
    query_x: tf.Tensor
    query_y: tf.Tensor
    classes: tf.Tensor | None = None

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]


def to_tensor(value) -> tf.Tensor:
    """A tensor of ``value`` (a ``tf.Tensor``, numpy array or nested Python list): floats as
    float32 (numpy's default float64 would not meet the network's float32 weights), integers
    (labels) as int32, as the episode pipelines give them; tensors are left as they are."""
    if isinstance(value, (tf.Tensor, tf.Variable)) or tf.is_symbolic_tensor(value):
        return value
    array = np.asarray(value)
    if np.issubdtype(array.dtype, np.floating):
        return tf.constant(array, tf.float32)
    if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
        return tf.constant(array.astype(np.int32))
    return tf.convert_to_tensor(array)


def as_episode(episode) -> Episode:
    """``episode`` with every field a tensor (``to_tensor``): numpy arrays and lists are
    accepted wherever an ``Episode`` is."""
    return Episode(*[None if v is None else to_tensor(v) for v in episode])
