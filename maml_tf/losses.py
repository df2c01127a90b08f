"""Per-task losses and metrics, and ``resolve`` that turns a user's loss into one.

Inside the learners every loss maps predictions ``[T, N, ...]`` and labels to one value
per task, ``[T]``: the tasks of a meta-batch are independent, and each task's gradient is
taken from its own mean loss.
"""

from __future__ import annotations

from typing import Callable

import keras
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


def auto_accuracy(outputs: tf.Tensor, labels: tf.Tensor) -> tf.Tensor | None:
    """Accuracy when the labels are class indices (integer, one axis fewer than the
    outputs); None otherwise (regression). Decided from static dtypes and ranks."""
    if labels.dtype.is_integer and outputs.shape.rank == labels.shape.rank + 1:
        return accuracy(outputs, labels)
    return None


NAMED = {"cross_entropy": cross_entropy, "mse": mean_squared_error}


def per_task(fn: Callable, name: str) -> Callable:
    """A Keras-style ``fn(y_true, y_pred)`` -> ``loss(outputs [T, N, ...], labels) -> [T]``.

    ``fn`` may return per-example values (``[T, N]`` or ``[T, N, ...]``, averaged per task)
    or one scalar (then it is called task by task)."""

    def loss(outputs, labels):
        values = fn(labels, outputs)
        values = tf.convert_to_tensor(values)
        if values.shape.rank == 0:
            tasks = outputs.shape[0]
            return tf.stack([tf.convert_to_tensor(fn(labels[t], outputs[t])) for t in range(tasks)])
        if values.shape[0] != outputs.shape[0]:
            raise ValueError(f"The loss {name} returned shape {values.shape} for outputs "
                             f"{outputs.shape}: it must keep the leading (task) axis.")
        values = tf.cast(values, outputs.dtype)
        return values if values.shape.rank == 1 else tf.reduce_mean(
            values, axis=list(range(1, values.shape.rank)))
    loss.__name__ = name
    return loss


def resolve(loss, metric="auto") -> tuple[Callable, Callable | None]:
    """(per-task loss, per-task metric or None) from what a user passes.

    loss: ``"cross_entropy"`` (softmax cross-entropy of logits against integer labels) or
      ``"mse"``; any other string is a Keras loss name with its Keras meaning (so
      ``"sparse_categorical_crossentropy"`` expects probabilities, as in ``model.compile``);
      a ``keras.losses.Loss`` object (its own settings, e.g. ``from_logits=True``); or a
      callable ``fn(y_true, y_pred)`` returning per-example losses or a scalar.
    metric: ``"auto"`` (accuracy when the labels are class indices, none for regression),
      ``"accuracy"``, None, or a callable ``fn(y_true, y_pred)`` as for the loss.
    """
    if isinstance(loss, str):
        if loss in NAMED:
            loss_fn = NAMED[loss]
        else:
            try:
                keras_fn = keras.losses.get(loss)
            except (ValueError, TypeError) as e:
                raise ValueError(f"Unknown loss {loss!r}: use 'cross_entropy', 'mse', a Keras "
                                 f"loss name, a keras.losses.Loss or a callable ({e}).") from None
            loss_fn = per_task(keras_fn, loss)
    elif isinstance(loss, keras.losses.Loss):
        loss_fn = per_task(loss.call, type(loss).__name__)   # unreduced per-example values
    elif callable(loss):
        loss_fn = per_task(loss, getattr(loss, "__name__", type(loss).__name__))
    else:
        raise TypeError(f"loss must be a name, a keras.losses.Loss or a callable, got {loss!r}.")
    metric_fn: Callable | None
    if metric == "auto":
        metric_fn = auto_accuracy
    elif metric == "accuracy":
        metric_fn = accuracy
    elif metric is None:
        metric_fn = None
    elif callable(metric):
        metric_fn = per_task(metric, getattr(metric, "__name__", "metric"))
    else:
        raise TypeError(f"metric must be 'auto', 'accuracy', None or a callable, got {metric!r}.")
    return loss_fn, metric_fn
