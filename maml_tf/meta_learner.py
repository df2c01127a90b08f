"""MAML's inner loop (``adapt``) and outer objective (``meta_loss``); no I/O, no flags.

All T tasks of a meta-batch are adapted together: the fast weights carry a leading
task axis (``[T, *shape]``), and since the tasks' losses are independent, the gradient
of their *sum* with respect to those fast weights is each task's own gradient. The
inner gradients are taken in a nested ``tf.GradientTape`` and, for second-order MAML,
stay on the outer tape, so the meta-gradient differentiates through every inner step.

Shapes (see ``data.episode.Episode``): support ``x`` ``[T, N_s, ...]``, ``y`` ``[T, N_s, ...]``;
query ``[T, N_q, ...]``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import tensorflow as tf

from data.episode import Episode
from models.functional import FunctionalModel, tile_for_tasks


@dataclasses.dataclass(frozen=True)
class StepMetrics:
    """Query metrics of each task after 0..S inner steps.

    loss: ``[T, S + 1]``; accuracy: ``[T, S + 1]`` or None for regression.
    """
    loss: tf.Tensor
    accuracy: tf.Tensor | None


class MetaLearner:
    """Second- or first-order MAML around a ``FunctionalModel``.

    Args:
      net: the model, called functionally on fast weights.
      loss_fn: ``(outputs [T,N,...], labels) -> [T]`` per-task loss.
      metric_fn: optional ``(outputs, labels) -> [T]`` (accuracy), or None.
      inner_lr: the inner SGD step size alpha.
      first_order: drop the second-order term: inner gradients are treated as
        constants by the outer tape (FOMAML).
      recompute: gradient checkpointing of the inner loop: keep only the fast weights of
        each step and recompute the step's activations in the backward pass (memory for
        time). The inner update must not read trainable variables.
    """

    def __init__(self, net: FunctionalModel, loss_fn: Callable, metric_fn: Callable | None,
                 inner_lr: float, first_order: bool = False, recompute: bool = False,
                 compute_dtype: str | None = None):
        self.net = net
        self.compute_dtype = tf.as_dtype(compute_dtype) if compute_dtype else None
        self.loss_fn = loss_fn
        self.metric_fn = metric_fn
        self.inner_lr = inner_lr
        self.first_order = first_order
        self.recompute = recompute

    # -- inner loop ---------------------------------------------------------------------
    def inner_update(self, params: list[tf.Tensor], grads: list[tf.Tensor],
                     step: int) -> list[tf.Tensor]:
        """One SGD step on the fast weights. Subclasses (Meta-SGD, LSLR) override."""
        lr = tf.constant(self.inner_lr, dtype=params[0].dtype)
        return [p - lr * g for p, g in zip(params, grads)]

    def support_grads(self, params: list[tf.Tensor], x: tf.Tensor, y: tf.Tensor,
                      first_order: bool) -> tuple[list[tf.Tensor], tf.Tensor]:
        """Gradient of each task's support loss w.r.t. its fast weights ``[T, *shape]``."""
        with tf.GradientTape() as tape:
            tape.watch(params)
            losses = self.loss_fn(self._forward(params, x), y)
            total = tf.reduce_sum(losses)
        grads = tape.gradient(total, params, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        if first_order:
            grads = [tf.stop_gradient(g) for g in grads]
        return grads, losses

    def adapt(self, weights: Sequence[tf.Tensor], x: tf.Tensor, y: tf.Tensor, steps: int,
              first_order: bool | None = None) -> list[list[tf.Tensor]]:
        """Runs ``steps`` inner SGD steps for every task.

        weights: meta-weights ``[*shape]``; x, y: support set ``[T, N_s, ...]``.
        Returns the fast weights after 0..steps steps, each ``[T, *shape]``.
        """
        first_order = self.first_order if first_order is None else first_order
        if self.compute_dtype is not None:
            weights = [tf.cast(w, self.compute_dtype) for w in weights]
        params = tile_for_tasks(weights, x.shape[0])
        trajectory = [params]
        for step in range(steps):
            def step_fn(*p, step=step):
                grads, _ = self.support_grads(list(p), x, y, first_order)
                return self.inner_update(list(p), grads, step)
            params = list(recomputed(step_fn)(*params) if self.recompute else step_fn(*params))
            trajectory.append(params)
        return trajectory

    def _forward(self, params: list[tf.Tensor], x: tf.Tensor) -> tf.Tensor:
        """Model outputs, in float32 whatever the compute dtype (losses stay accurate)."""
        if self.compute_dtype is None:
            return self.net.apply(params, x)
        return tf.cast(self.net.apply(params, tf.cast(x, self.compute_dtype)), tf.float32)

    # -- outer objective ----------------------------------------------------------------
    def query_metrics(self, params: list[tf.Tensor], x: tf.Tensor,
                      y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor | None]:
        out = self._forward(params, x)
        metric = self.metric_fn(out, y) if self.metric_fn is not None else None
        return self.loss_fn(out, y), metric

    def meta_loss(self, weights: Sequence[tf.Tensor], episode: Episode, steps: int,
                  first_order: bool | None = None,
                  track_steps: bool = True) -> tuple[tf.Tensor, StepMetrics]:
        """Query loss after ``steps`` inner steps, averaged over tasks (a scalar).

        With ``track_steps`` the query metrics after every intermediate step are also
        computed (for TensorBoard); otherwise only the first and last.
        """
        trajectory = self.adapt(weights, episode.support_x, episode.support_y, steps,
                                first_order)
        tracked = range(len(trajectory)) if track_steps else sorted({0, len(trajectory) - 1})
        losses, metrics = [], []
        for k in tracked:
            loss, metric = self.query_metrics(trajectory[k], episode.query_x, episode.query_y)
            losses.append(loss)
            metrics.append(metric)
        per_step = StepMetrics(tf.stack(losses, axis=1),
                               None if metrics[0] is None else tf.stack(metrics, axis=1))
        return tf.reduce_mean(losses[-1]), per_step


def recomputed(fn: Callable) -> Callable:
    """``fn(*tensors) -> list of tensors`` whose backward pass recomputes ``fn``.

    ``tf.recompute_grad`` was measured to drop the second-order path of an inner step
    (a wrong meta-gradient), so this is a plain ``tf.custom_gradient``: the forward pass
    keeps no activations, and the gradient re-runs ``fn`` under a fresh tape, which
    differentiates through the nested inner tape as usual.
    """

    @tf.custom_gradient
    def wrapper(*inputs):
        def grad_fn(*upstream):
            # The barrier ties the recomputation to the upstream gradient, so neither
            # XLA nor Grappler can merge it with the forward pass (which would keep the
            # activations alive and save nothing).
            copies = _barrier(list(inputs), list(upstream))
            with tf.GradientTape() as tape:
                tape.watch(copies)
                out = fn(*copies)
            return tape.gradient(out, copies, output_gradients=list(upstream),
                                 unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return fn(*inputs), grad_fn

    return wrapper


def _barrier(tensors: list[tf.Tensor], after: list[tf.Tensor]) -> list[tf.Tensor]:
    """Copies of ``tensors`` that depend on ``after`` (an XLA optimization barrier)."""
    from tensorflow.compiler.tf2xla.python import xla
    return list(xla.optimization_barrier(*tensors, *after))[:len(tensors)]
