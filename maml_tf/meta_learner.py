"""MAML's inner loop (``adapt``) and outer objective (``meta_loss``); no I/O, no flags.

All T tasks of a meta-batch are adapted together: the fast weights carry a leading
task axis (``[T, *shape]``), and since the tasks' losses are independent, the gradient
of their *sum* with respect to those fast weights is each task's own gradient. The
inner gradients are taken in a nested ``tf.GradientTape`` and, for second-order MAML,
stay on the outer tape, so the meta-gradient differentiates through every inner step.

Shapes (see ``data.episode.Episode``): support ``x`` ``[T, N_s, ...]``, ``y`` ``[T, N_s, ...]``;
query ``[T, N_q, ...]``.

Why this module is long: it is the one contract that 19 learners subclass, and the inner
loop, the per-step query metrics, the evaluation modes and the memory-saving recompute are
one computation whose parts read each other's state; split, each part would need the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from typing import Callable, Sequence

import tensorflow as tf

import keras

from maml_tf import losses
from maml_tf.data.episode import Episode, as_episode, to_tensor
from maml_tf.models import mixed
from maml_tf.models.functional import (FunctionalModel, inference, tile_for_tasks,
                                       with_support_statistics)

# How evaluation normalises a task's queries (``MetaLearner.eval_metrics_in_mode``):
# "transductive": each forward pass on the queries uses the statistics of the whole query batch
#   (the paper's protocol; batch norm then sees every query of the task at once);
# "support": the queries are normalised with the statistics of the (adapted) network on the
#   task's support set only (the MAML family and the embedding learners);
# "per_example": each query is predicted on its own, as if it were the task's only query.
EVAL_MODES = ("transductive", "support", "per_example")


@dataclasses.dataclass(frozen=True)
class StepMetrics:
    """Query metrics of each task after 0..S inner steps.

    loss: ``[T, S + 1]``; accuracy: ``[T, S + 1]`` or None for regression.
    state_update: new values for the learner's ``state`` variables, measured on this
      meta-batch (MAML++'s per-step batch-norm statistics), or None.
    """
    loss: tf.Tensor
    accuracy: tf.Tensor | None
    state_update: list | None = None


class MetaLearner(tf.Module):
    """Second- or first-order MAML around a Keras model: the public learner
    (``maml_tf.MAML``) and the core that every algorithm of ``maml_tf.algorithms``
    specialises through a few hooks.

    Use from Python (shapes: ``x`` ``[T, N, ...]``, one row per task)::

        learner = maml_tf.MAML(model, inner_lr=0.4, inner_steps=1)
        fast = learner.adapt(support_x, support_y)       # fast weights, each [T, *shape]
        logits = learner.predict(fast, query_x)          # [T, N_q, way]
        loss, grads = learner.meta_gradient(episode)     # grads align with meta_variables
        optimizer.apply(grads, learner.meta_variables)

    Meta-parameters are ``meta_variables``: the network's weights, then the algorithm's own
    learned tensors (``extra``: Meta-SGD's rates, MAML++'s per-step rates and norm weights).
    Compiled code receives them, then the non-trainable ``state`` (MAML++'s per-step
    batch-norm statistics), as one list of tensors, ``weights``, in that order.

    Hooks for subclasses: ``inner_lr_for`` / ``inner_update`` (how fast weights move),
    ``adapted`` (which of them move: BOIL, CAVIA), ``initial_fast_weights`` (CAVIA's context),
    ``step_params`` / ``forward_at`` (what the network sees at inner step k), ``inner_loop``
    (the whole inner loop: ANIL, pre-training), ``objective`` (how per-step query losses
    combine), ``meta_step`` (Reptile replaces the tape), ``first_order_at`` (MAML++'s
    annealing), ``update_state`` (MAML++'s running statistics) and ``write_summaries``
    (extra TensorBoard state).

    Args:
      model: any built ``keras.Model`` (Sequential, Functional or subclassed), run on fast
        weights by ``models.functional.FunctionalModel`` (or such a view already).
      inner_lr: the inner step size alpha.
      inner_steps: inner steps that ``adapt``, ``meta_gradient`` and ``evaluate`` take by
        default.
      first_order: drop the second-order term: inner gradients are treated as
        constants by the outer tape (FOMAML).
      loss: ``"cross_entropy"`` (logits against integer labels; the default), ``"mse"``, a
        Keras loss name, a ``keras.losses.Loss`` or a callable ``fn(y_true, y_pred)``; see
        ``maml_tf.losses.resolve``.
      metric: ``"auto"`` (accuracy for integer labels), ``"accuracy"``, None or a callable.
      recompute: gradient checkpointing of the inner loop: keep only the fast weights of
        each step and recompute the step's activations in the backward pass (memory for
        time).
      compute_dtype: dtype of the inner loop and forward passes (None: the model's), or
        ``"mixed_bfloat16"``: float32 everywhere except the convolutions and matmuls
        (``models.mixed``).
      inner_optimizer: ``"sgd"`` or ``"adam"`` (Adam with beta1 = 0, as Reptile; its
        state starts at zero for every task and is differentiable like SGD).
      allow_inexact: accept (with a warning) a model holding a layer whose second
        derivative maml_tf does not know to be exact; by default a learner that needs
        second derivatives refuses it (``InexactModelError``).
    """

    # What the columns of evaluation's metrics count (``eval_metrics``): "inner_steps" (after
    # 0..S inner steps), "shots_seen" (after 0..K support examples per class were read: the
    # black-box learners) or None (one column: the embedding learners).
    metric_axis: str | None = "inner_steps"

    # Whether meta-training differentiates through inner gradients (False: first-order
    # algorithms, ProtoNets, pre-training), which decides if inexact layers are refused.
    SECOND_ORDER = True

    def __init__(self, model, *, inner_lr: float = 0.01, inner_steps: int = 1,
                 first_order: bool = False, loss="cross_entropy", metric="auto",
                 recompute: bool = False, compute_dtype: str | None = None,
                 inner_optimizer: str = "sgd", allow_inexact: bool = False):
        super().__init__()
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.first_order = bool(first_order)
        self.recompute = bool(recompute)
        # --precision=mixed_bfloat16 keeps every weight float32 and only the kernels low.
        self.kernel_dtype = mixed.PRECISIONS.get(compute_dtype)
        self.compute_dtype = (tf.as_dtype(compute_dtype) if compute_dtype
                              and self.kernel_dtype is None else None)
        self.loss_fn, self.metric_fn = losses.resolve(loss, metric)
        if inner_optimizer not in ("sgd", "adam"):
            raise ValueError(f"inner_optimizer must be 'sgd' or 'adam', got {inner_optimizer!r}.")
        if self.inner_steps < 0:
            raise ValueError(f"inner_steps must be >= 0, got {inner_steps}.")
        self.inner_optimizer = inner_optimizer
        self.allow_inexact = bool(allow_inexact)
        if isinstance(model, keras.Model):
            strict = self.SECOND_ORDER and not self.first_order and not allow_inexact
            model = FunctionalModel(model, strict=strict)
        self.net = model
        if self.recompute and isinstance(model, FunctionalModel) and model.batched and any(
                type(op) is keras.layers.Dropout for op in model._ops()):
            raise ValueError("recompute re-runs each inner step in the backward pass, which "
                             "would draw new dropout masks: use one of recompute and Dropout.")
        self.extra: list[tf.Variable] = []
        self.state: list[tf.Variable] = []
        # Set by eval_metrics_in_mode while it traces.
        self._eval_mode: types.SimpleNamespace | None = None

    # -- the public API -----------------------------------------------------------------
    def adapt(self, support_x, support_y, steps: int | None = None,
              weights: Sequence[tf.Tensor] | None = None) -> list[tf.Tensor]:
        """Adapts to each task of a support set: x ``[T, N_s, ...]``, y ``[T, N_s, ...]``.

        Returns the network's fast weights after ``steps`` (default ``inner_steps``) inner
        steps, one tensor ``[T, *variable.shape]`` per entry of ``net.variables``. On a
        ``tf.GradientTape`` watching the meta-weights, they carry the second-order path.
        """
        weights = self.meta_weights() if weights is None else list(weights)
        x, y = to_tensor(support_x), to_tensor(support_y)
        return self.inner_loop(weights, x, y, self.inner_steps if steps is None else steps)[-1]

    def predict(self, fast_weights: Sequence[tf.Tensor], x, step: int | None = None) -> tf.Tensor:
        """The network's outputs ``[T, N, ...]`` on x ``[T, N, ...]`` at ``fast_weights``
        (from ``adapt``). ``step``: the inner step they come from (MAML++'s per-step norm
        weights; default ``inner_steps``)."""
        extra = self.split(self.meta_weights())[1]
        return self.forward_at(list(fast_weights), to_tensor(x), extra,
                               self.inner_steps if step is None else step)

    def meta_gradient(self, episode: Episode, steps: int | None = None,
                      weights: Sequence[tf.Tensor] | None = None,
                      iteration=None) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """(meta-loss, its gradient) for one meta-batch; the gradient is a list aligned with
        ``meta_variables``, ready for ``optimizer.apply(grads, learner.meta_variables)``."""
        weights = self.meta_weights() if weights is None else list(weights)
        steps = self.inner_steps if steps is None else steps
        loss, grads, _ = self.meta_step(weights, as_episode(episode), steps, iteration)
        return loss, grads[:len(self.meta_variables)]

    def evaluate(self, episode: Episode, steps: int | None = None) -> StepMetrics:
        """Query metrics of each task along ``metric_axis`` (after 0..steps inner steps,
        default ``inner_steps``), in evaluation mode (dropout off), without the second-order
        path."""
        with inference():
            return self.eval_metrics(self.meta_weights(), as_episode(episode),
                                     self.inner_steps if steps is None else steps)

    def eval_metrics_in_mode(self, weights: Sequence[tf.Tensor], episode: Episode, steps: int,
                             mode: str = "transductive") -> StepMetrics:
        """``eval_metrics`` with the queries normalised as ``mode`` says (``EVAL_MODES``).

        ``per_example``: learners whose queries pass ``query_metrics`` (the MAML family) predict
        each query alone at the adapted weights; the others (embedding and black-box learners)
        are evaluated on episodes of one query each, with the task's support set, and each
        task's metrics are the mean over its queries. ``support``: the MAML family (the adapted
        network's statistics) and the embedding learners and ANIL (the body's statistics on
        the support set); not the regression CNP.
        """
        if mode not in EVAL_MODES:
            raise ValueError(f"eval mode must be one of {EVAL_MODES}, got {mode!r}.")
        episode = as_episode(episode)
        if mode == "transductive":
            return self.eval_metrics(weights, episode, steps)
        if mode == "support" and not self.normalises_queries_with_support:
            raise ValueError(f"The support evaluation mode normalises queries with the "
                             f"network's statistics on the support set; {type(self).__name__} "
                             "does not run its queries through such a network: use per_example.")
        if mode == "per_example" and not self.queries_pass_query_metrics:
            return _per_query(lambda ep: self.eval_metrics(weights, ep, steps), episode)
        with self._evaluating_in(mode, episode):
            return self.eval_metrics(weights, episode, steps)

    @contextlib.contextmanager
    def _evaluating_in(self, mode: str, episode: Episode):
        """Within: forward passes on queries follow ``mode`` (read while tracing)."""
        self._eval_mode = types.SimpleNamespace(mode=mode, support_x=episode.support_x)
        try:
            yield
        finally:
            self._eval_mode = None

    def predict_queries(self, episode: Episode, steps: int | None = None,
                        mode: str = "transductive") -> tf.Tensor:
        """The learner's test-time prediction of the queries, ``[T, N_q, ...]`` (logits for
        classifiers): after ``steps`` inner steps (default ``inner_steps``) on each task's
        support set, or from the support set's embeddings or sequence, with the queries
        normalised as ``mode`` (``EVAL_MODES``) says; evaluation mode, no second-order path.
        What ``maml_tf.evaluate`` scores and what an exported model serves. ``episode`` needs
        no ``query_y``."""
        if mode not in EVAL_MODES:
            raise ValueError(f"eval mode must be one of {EVAL_MODES}, got {mode!r}.")
        if mode == "support" and not self.normalises_queries_with_support:
            raise ValueError(f"{type(self).__name__} does not run its queries through a network "
                             "that the support set's statistics could normalise: use "
                             "transductive or per_example.")
        steps = self.inner_steps if steps is None else steps
        weights, episode = self.meta_weights(), as_episode(episode)
        if episode.query_y is None:   # the learners read only its shape
            episode = episode._replace(query_y=tf.zeros(episode.query_x.shape[:2], tf.int32))
        with inference():
            if mode == "per_example" and not self.queries_pass_query_metrics:
                # Episodes of one query each, with the task's support set (as evaluation).
                t, n = episode.query_x.shape[0], episode.query_x.shape[1]
                out = self.query_predictions(weights, _one_query_each(episode), steps)
                return tf.reshape(out, [t, n] + out.shape.as_list()[2:])
            with self._evaluating_in(mode, episode):
                return self.query_predictions(weights, episode, steps)

    def query_predictions(self, weights: Sequence[tf.Tensor], episode: Episode,
                          steps: int) -> tf.Tensor:
        """Outputs ``[T, N_q, ...]`` on the queries at ``weights``, after adapting to the
        support set as this learner does at test time (here: ``steps`` inner steps). The hook
        behind ``predict_queries``; learners without an inner loop override it."""
        fast = self.inner_loop(weights, episode.support_x, episode.support_y, steps,
                               first_order=True)[-1]
        return self.query_outputs(fast, episode.query_x, self.split(weights)[1], steps)

    @property
    def normalises_queries_with_support(self) -> bool:
        """Whether the ``support`` evaluation mode applies: the queries run through the
        (adapted) network whose support statistics can normalise them."""
        return self.queries_pass_query_metrics

    @property
    def queries_pass_query_metrics(self) -> bool:
        """Whether evaluation computes query outputs through ``query_metrics`` (the learners
        that adapt a network by gradient steps), where the ``support`` and per-query
        ``per_example`` modes apply."""
        cls = type(self)
        return cls.eval_metrics is MetaLearner.eval_metrics and cls.meta_loss is MetaLearner.meta_loss

    def eval_metrics(self, weights: Sequence[tf.Tensor], episode: Episode,
                     steps: int) -> StepMetrics:
        """Query metrics along ``metric_axis`` at ``weights`` (no second-order path): after
        0..steps inner steps here; black-box learners report them by shots seen."""
        # No outer tape here, so first_order=True only saves work; values are identical.
        return self.meta_loss(weights, episode, steps, first_order=True)[1]

    # -- meta-parameters ----------------------------------------------------------------
    @property
    def model(self) -> keras.Model:
        """The Keras model whose variables hold the network's meta-weights (the
        meta-initialisation); the algorithm's own learned tensors are in ``extra``."""
        return getattr(self.net, "model", self.net)

    @property
    def meta_variables(self) -> list[tf.Variable]:
        """Everything the outer optimizer updates: the network's weights, then ``extra``."""
        return list(self.net.variables) + list(self.extra)

    def meta_weights(self) -> list[tf.Tensor]:
        """The current values of ``meta_variables`` and ``state`` as tensors."""
        return self.net.meta_weights() + [tf.convert_to_tensor(v) for v in self.extra + self.state]

    def split(self, weights: Sequence[tf.Tensor]) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
        """``weights`` -> (network weights, the algorithm's extra tensors then its state)."""
        n = len(self.net.variables)
        return list(weights[:n]), list(weights[n:])

    @property
    def reports_inner_steps(self) -> bool:
        """Whether ``StepMetrics`` has a column per inner step in training (False: one
        column, the learners without an inner loop)."""
        return self.metric_axis == "inner_steps"

    # -- inner loop ---------------------------------------------------------------------
    def init_inner_state(self, params: list[tf.Tensor]) -> list[tf.Tensor]:
        """The inner optimizer's state for fast weights ``params`` (Adam: the second
        moments; with beta1 = 0 the first moment is the current gradient)."""
        if self.inner_optimizer == "adam":
            return [tf.zeros_like(p) for p in params]
        return []

    def inner_lr_for(self, index: int, step: int, extra: list[tf.Tensor], dtype) -> tf.Tensor:
        """The step size of parameter ``index`` at inner step ``step`` (broadcastable to
        ``[T, *shape]``). Meta-SGD and LSLR return learned tensors."""
        return tf.constant(self.inner_lr, dtype=dtype)

    def inner_update(self, params: list[tf.Tensor], grads: list[tf.Tensor | None],
                     state: list[tf.Tensor], extra: list[tf.Tensor],
                     step: int) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
        """One inner step on the fast weights -> (new params, new optimizer state).
        A ``None`` gradient marks a fast weight that the inner loop does not adapt."""
        lrs = [tf.cast(self.inner_lr_for(i, step, extra, p.dtype), p.dtype)
               for i, p in enumerate(params)]
        if self.inner_optimizer == "sgd":
            return [p if g is None else p - lr * g for p, lr, g in zip(params, lrs, grads)], state
        b2, eps, t = 0.999, 1e-8, float(step + 1)
        v = [v0 if g is None else b2 * v0 + (1 - b2) * tf.square(g)
             for v0, g in zip(state, grads)]
        new = [p if g is None else p - lr * g / (tf.sqrt(vk / (1 - b2 ** t)) + eps)
               for p, lr, g, vk in zip(params, lrs, grads, v)]
        return new, v

    def adapted(self, num_params: int) -> list[bool]:
        """Which of the ``num_params`` fast weights the inner loop moves (all by default;
        BOIL freezes the head, CAVIA adapts its context only). Frozen ones keep their
        meta-values and cost no inner gradient."""
        return [True] * num_params

    def initial_fast_weights(self, net_weights: list[tf.Tensor], num_tasks: int,
                             extra: list[tf.Tensor]) -> list[tf.Tensor]:
        """The fast weights at inner step 0, each ``[T, *shape]``: the network's weights
        copied per task (CAVIA appends its context vector)."""
        return tile_for_tasks(net_weights, num_tasks)

    def step_params(self, params: list[tf.Tensor], extra: list[tf.Tensor],
                    step: int) -> list[tf.Tensor]:
        """The network weights used at inner step ``step`` (MAML++ swaps in per-step norm
        weights). ``params`` are the fast weights ``[T, *shape]``."""
        return params

    def forward_at(self, params: list[tf.Tensor], x: tf.Tensor, extra: Sequence[tf.Tensor],
                   step: int) -> tf.Tensor:
        """Outputs ``[T, N, ...]`` at inner step ``step`` for fast weights ``params``."""
        return self._forward(self.step_params(params, list(extra), step), x)

    def support_grads(self, params: list[tf.Tensor], x: tf.Tensor, y: tf.Tensor,
                      first_order: bool, extra: Sequence[tf.Tensor] = (),
                      step: int = 0) -> tuple[list[tf.Tensor], tf.Tensor]:
        """Gradient of each task's support loss w.r.t. its fast weights ``[T, *shape]``
        (None for those that ``adapted`` leaves frozen)."""
        mask = self.adapted(len(params))
        moving = [p for p, m in zip(params, mask) if m]
        with tf.GradientTape() as tape, self._inner_kernels():
            tape.watch(moving)
            out = self.forward_at(params, x, extra, step)
            losses = self.loss_fn(out, y)
            total = tf.reduce_sum(losses)
        found = iter(tape.gradient(total, moving,
                                   unconnected_gradients=tf.UnconnectedGradients.ZERO))
        grads = [next(found) if m else None for m in mask]
        if first_order:
            grads = [None if g is None else tf.stop_gradient(g) for g in grads]
        return grads, losses

    @contextlib.contextmanager
    def _inner_kernels(self):
        """Under --precision=mixed_bfloat16 the inner loop's kernels run in float32. Why:
        measured on Omniglot 5-way 1-shot (inner step 0.4), bfloat16 support gradients, moved
        by the inner step, left the meta-gradient at cosine 0.86 to float64's; float32 inner
        kernels give 0.995, for 3-6% of the step's time (benchmarks/README.md)."""
        kernel = self.kernel_dtype
        if kernel is not None:
            self.kernel_dtype = tf.float32
        try:
            yield
        finally:
            self.kernel_dtype = kernel

    def inner_loop(self, weights: Sequence[tf.Tensor], x: tf.Tensor, y: tf.Tensor, steps: int,
                   first_order: bool | None = None) -> list[list[tf.Tensor]]:
        """Runs ``steps`` inner steps for every task.

        weights: meta-weights (``meta_variables`` order); x, y: support set ``[T, N_s, ...]``.
        Returns the network's fast weights after 0..steps steps, each ``[T, *shape]``.
        """
        first_order = self.first_order if first_order is None else first_order
        net_weights, extra = self.split(weights)
        if self.compute_dtype is not None:
            net_weights = [tf.cast(w, self.compute_dtype) for w in net_weights]
        params = self.initial_fast_weights(net_weights, x.shape[0], extra)
        state = self.init_inner_state(params)
        n, m = len(params), len(state)
        trajectory = [params]
        for step in range(steps):
            # Extra tensors enter as explicit inputs so that a recomputed step passes their
            # gradients on (a custom_gradient does not differentiate captured tensors).
            def step_fn(*inputs, step=step):
                p, s, e = list(inputs[:n]), list(inputs[n:n + m]), list(inputs[n + m:])
                grads, _ = self.support_grads(p, x, y, first_order, e, step)
                new_p, new_s = self.inner_update(p, grads, s, e, step)
                return new_p + new_s
            inputs = params + state + extra
            out = list(recomputed(step_fn)(*inputs) if self.recompute else step_fn(*inputs))
            params, state = out[:n], out[n:]
            trajectory.append(params)
        return trajectory

    def _forward(self, params: list[tf.Tensor], x: tf.Tensor, **norm) -> tf.Tensor:
        """Model outputs, in float32 whatever the compute dtype (losses stay accurate).
        ``norm``: ``norm_stats`` / ``collect`` for ``FunctionalModel.apply``."""
        return self.apply_in_compute_dtype(self.net, params, x, **norm)

    def apply_in_compute_dtype(self, stack, params: Sequence[tf.Tensor], x: tf.Tensor,
                               **kwargs) -> tf.Tensor:
        """``stack.apply(params, x)`` (a ``FunctionalModel`` or a ``LayerStack`` of it) in the
        compute dtype; outputs float32."""
        if self.kernel_dtype is not None:
            with mixed.kernels_in(self.kernel_dtype):
                return tf.cast(stack.apply(params, x, **kwargs), tf.float32)
        if self.compute_dtype is None:
            return stack.apply(params, x, **kwargs)
        params = [tf.cast(p, self.compute_dtype) for p in params]
        return tf.cast(stack.apply(params, tf.cast(x, self.compute_dtype), **kwargs), tf.float32)

    # -- outer objective ----------------------------------------------------------------
    def query_metrics(self, params: list[tf.Tensor], x: tf.Tensor, y: tf.Tensor,
                      extra: Sequence[tf.Tensor] = (),
                      step: int = 0) -> tuple[tf.Tensor, tf.Tensor | None]:
        """Per-task query loss ``[T]`` and metric ``[T]`` (or None) at fast weights ``params``."""
        out = self.query_outputs(params, x, extra, step)
        metric = self.metric_fn(out, y) if self.metric_fn is not None else None
        return self.loss_fn(out, y), metric

    def query_outputs(self, params: list[tf.Tensor], x: tf.Tensor, extra: Sequence[tf.Tensor],
                      step: int) -> tf.Tensor:
        """Outputs ``[T, N_q, ...]`` on the queries at fast weights ``params``, normalised as the
        evaluation mode says (transductive outside ``eval_metrics_in_mode``)."""
        mode = getattr(self, "_eval_mode", None)
        if mode is None or mode.mode == "transductive":
            return self.forward_at(params, x, extra, step)
        if mode.mode == "per_example":
            # Each query as a task of its own, with its task's fast weights.
            t, n = x.shape[0], x.shape[1]
            singles = tf.reshape(x, [t * n, 1] + x.shape.as_list()[2:])
            out = self.forward_at([tf.repeat(p, n, axis=0) for p in params], singles, extra, step)
            return tf.reshape(out, [t, n] + out.shape.as_list()[2:])
        return with_support_statistics(lambda: self.forward_at(params, mode.support_x, extra, step),
                                       lambda: self.forward_at(params, x, extra, step))[1]

    def objective(self, step_losses: list[tf.Tensor], iteration: tf.Tensor | None) -> tf.Tensor:
        """The meta-loss from per-task query losses (a list of ``[T]``, after 0..S steps):
        the mean over tasks after the last step. MAML++'s multi-step loss overrides this."""
        return tf.reduce_mean(step_losses[-1])

    def meta_loss(self, weights: Sequence[tf.Tensor], episode: Episode, steps: int,
                  first_order: bool | None = None, track_steps: bool = True,
                  iteration: tf.Tensor | None = None) -> tuple[tf.Tensor, StepMetrics]:
        """Query loss after ``steps`` inner steps, combined over tasks by ``objective``.

        With ``track_steps`` the queries are scored after every inner step (``StepMetrics``
        of ``[T, steps + 1]``, for TensorBoard and the multi-step loss); otherwise after the
        last one only (``[T, 1]``), which is all the meta-gradient needs: with 5 inner steps
        on mini-ImageNet the other query passes were half of the meta-step's time.
        ``iteration`` (a scalar tensor) is the meta-training iteration, for schedules inside
        the objective.
        """
        trajectory = self.inner_loop(weights, episode.support_x, episode.support_y, steps,
                                     first_order)
        losses, metrics = self._score(trajectory, episode, self.split(weights)[1], track_steps)
        # The objective reads the per-step losses before they are stacked: a gradient through
        # the stack would send zeros back through every unused step's query pass, which XLA
        # does not prune (measured: +2.5 GFLOP per Omniglot 5w1s step).
        return self.objective(losses, iteration), _stack(losses, metrics)

    def score(self, trajectory: list[list[tf.Tensor]], episode: Episode,
              extra: Sequence[tf.Tensor] = (), track_steps: bool = True) -> StepMetrics:
        """Query metrics at each fast-weight set of ``trajectory`` (or at its last only)."""
        return _stack(*self._score(trajectory, episode, extra, track_steps))

    def _score(self, trajectory, episode, extra, track_steps):
        tracked = range(len(trajectory)) if track_steps else [len(trajectory) - 1]
        losses, metrics = [], []
        for k in tracked:
            loss, metric = self.query_metrics(trajectory[k], episode.query_x, episode.query_y,
                                              extra, k)
            losses.append(loss)
            metrics.append(metric)
        return losses, metrics

    def meta_step(self, weights: list[tf.Tensor], episode: Episode, steps: int,
                  iteration: tf.Tensor | None = None, first_order: bool | None = None,
                  track_steps: bool = True) -> tuple[tf.Tensor, list[tf.Tensor], StepMetrics]:
        """(meta-loss, its gradient w.r.t. ``weights``, per-step metrics) for one meta-batch.

        The gradient is what the outer optimizer applies (a descent direction); Reptile
        overrides it with its pseudo-gradient. ``track_steps`` as in ``meta_loss``: the
        gradient is the same either way.
        """
        with tf.GradientTape() as tape:
            tape.watch(weights)
            loss, per_step = self.meta_loss(weights, episode, steps, first_order,
                                            track_steps, iteration)
        grads = tape.gradient(loss, weights, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return loss, grads, per_step

    # -- schedules and summaries ---------------------------------------------------------
    def first_order_at(self, iteration: int) -> bool:
        """Whether meta-training iteration ``iteration`` (0-based) drops the second-order term."""
        return self.first_order

    def scores_every_step_at(self, iteration: int) -> bool:
        """Whether meta-training iteration ``iteration`` (0-based) must score the queries
        after every inner step whatever ``--step_metrics_every`` says, because its update
        reads them (MAML++'s multi-step loss and per-step batch-norm statistics)."""
        return False

    def write_summaries(self, step: int) -> None:
        """Writes the algorithm's extra state (learned rates, loss weights) to TensorBoard."""

    def update_state(self, values: list[tf.Tensor]) -> None:
        """Folds a meta-batch's ``StepMetrics.state_update`` into ``state`` (train step)."""


def _one_query_each(episode: Episode) -> Episode:
    """T x N_q episodes of one query each: each task's support set repeated N_q times."""
    t, n = episode.query_x.shape[0], episode.query_x.shape[1]
    rep = lambda a: None if a is None else tf.repeat(a, n, axis=0)   # noqa: E731
    one = lambda a: tf.reshape(a, [t * n, 1] + a.shape.as_list()[2:])   # noqa: E731
    return Episode(rep(episode.support_x), rep(episode.support_y), one(episode.query_x),
                   one(episode.query_y), rep(episode.classes))


def _per_query(evaluate: Callable, episode: Episode) -> StepMetrics:
    """``evaluate`` on T x N_q episodes of one query each (the task's support set repeated),
    then each task's metrics averaged over its queries."""
    t, n = episode.query_x.shape[0], episode.query_x.shape[1]
    m = evaluate(_one_query_each(episode))
    mean = lambda v: None if v is None else tf.reduce_mean(   # noqa: E731
        tf.reshape(v, [t, n] + v.shape.as_list()[1:]), axis=1)
    return StepMetrics(mean(m.loss), mean(m.accuracy))


def _stack(losses: list[tf.Tensor], metrics: list) -> StepMetrics:
    return StepMetrics(tf.stack(losses, axis=1),
                       None if metrics[0] is None else tf.stack(metrics, axis=1))


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
