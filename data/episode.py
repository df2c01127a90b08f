"""The ``Episode``: a meta-batch of few-shot tasks, with a leading task axis.

For N-way K-shot classification with Q queries per class and T tasks:

* ``support_x``: float ``[T, N*K, H, W, C]``; ``support_y``: int32 ``[T, N*K]`` in 0..N-1
* ``query_x``: float ``[T, N*Q, H, W, C]``; ``query_y``: int32 ``[T, N*Q]``

For sinusoid regression with K support and Q query points:

* ``support_x``, ``support_y``: float ``[T, K, 1]``; ``query_x``, ``query_y``: ``[T, Q, 1]``

Labels are permuted independently for every task, so no output unit means one class.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf


class Episode(NamedTuple):
    support_x: tf.Tensor
    support_y: tf.Tensor
    query_x: tf.Tensor
    query_y: tf.Tensor

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]
