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
