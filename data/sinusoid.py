"""Sinusoid regression tasks (Finn et al. 2017, section 5.1).

A task is ``y = A sin(x - phi)`` with amplitude ``A ~ U[0.1, 5]``, phase ``phi ~ U[0, pi]``
and inputs ``x ~ U[-5, 5]``.
"""

from __future__ import annotations

import math

import tensorflow as tf

from maml_tf.data.tasks import seeds_for

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
INPUT_RANGE = (-5.0, 5.0)


def task_params(stream: int, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(amplitude, phase) scalars of task ``index``."""
    seeds = seeds_for(stream, index, 3)
    amp = tf.random.stateless_uniform([], seeds[0], *AMPLITUDE)
    phase = tf.random.stateless_uniform([], seeds[1], *PHASE)
    return amp, phase


def sample_task(stream: int, index: tf.Tensor, shot: int, query: int):
    """One task: ``(support_x, support_y, query_x, query_y)``, each ``[K or Q, 1]`` float32."""
    amp, phase = task_params(stream, index)
    seeds = seeds_for(stream, index, 3)
    xs = tf.random.stateless_uniform([shot, 1], seeds[2], *INPUT_RANGE)
    # The query points come from their own seed, so they do not depend on `shot`.
    xq = tf.random.stateless_uniform([query, 1], tf.random.experimental.stateless_fold_in(
        seeds[2], 1), *INPUT_RANGE)
    curve = lambda x: amp * tf.sin(x - phase)
    return xs, curve(xs), xq, curve(xq)
