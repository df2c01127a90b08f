"""Per-task losses. Every function maps ``[T, N, ...]`` predictions to ``[T]`` values."""

from __future__ import annotations

import tensorflow as tf


def cross_entropy(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """logits ``[T, N, way]``, labels int ``[T, N]`` -> mean loss per task ``[T]``."""
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    return tf.reduce_mean(ce, axis=1)


def accuracy(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """logits ``[T, N, way]``, labels int ``[T, N]`` -> accuracy per task ``[T]``."""
    hits = tf.equal(tf.argmax(logits, axis=-1, output_type=labels.dtype), labels)
    return tf.reduce_mean(tf.cast(hits, logits.dtype), axis=1)


def mean_squared_error(pred: tf.Tensor, target: tf.Tensor) -> tf.Tensor:
    """pred, target ``[T, N, D]`` -> mean squared error per task ``[T]``."""
    return tf.reduce_mean(tf.square(pred - tf.cast(target, pred.dtype)), axis=[1, 2])


LOSSES = {"classification": (cross_entropy, accuracy), "regression": (mean_squared_error, None)}
