"""The compiled meta-step of the supervised family: per-replica meta-gradients (one XLA
program per setting), all-reduced over the replicas, checked for non-finite values, clipped,
applied. ``make_train_step(run)`` is what ``supervised.SupervisedFamily`` calls each
iteration, and what the benchmarks time.
"""

from __future__ import annotations

import tensorflow as tf

from maml_tf.algorithms import train_inner_steps
from maml_tf.family import Run
from maml_tf.models import mixed


def make_train_step(run: Run):
    """The meta-step: per-replica meta-gradients (XLA), all-reduced, checked, applied.

    Returns ``train_step(episode, first_order=None, step_metrics=True)``. Both flags are
    Python values, so each setting compiles once (MAML++ switches from first to second order
    once). ``step_metrics``: also score the queries after every inner step (the output's
    ``step_loss`` / ``step_accuracy``, ``[steps + 1]``); without it the step scores only
    the last one, which is the same update at up to half the cost, and returns no per-step
    metrics. ``train_step.compile(episode, first_order, step_metrics)`` compiles (and
    runs, without applying) one setting's meta-gradient, so that timing can exclude it.
    """
    config, strategy, learner = run.config, run.strategy, run.learner
    variables = learner.meta_variables
    steps = train_inner_steps(config)
    replicas = strategy.num_replicas_in_sync

    def chunk_gradient(weights, episode, iteration, first_order, step_metrics):
        loss, grads, per_step = learner.meta_step(weights, episode, steps, iteration,
                                                  first_order, step_metrics)
        acc = per_step.accuracy if per_step.accuracy is not None else per_step.loss
        # Only the meta-variables are trained; the learner's state gets its own update.
        return [loss, grads[:len(variables)], tf.reduce_mean(per_step.loss, 0),
                tf.reduce_mean(acc, 0), list(per_step.state_update or [])]

    @tf.function(jit_compile=mixed.whole_step_xla(config.precision, config.jit_compile))
    def meta_gradient(weights, episode, iteration, first_order, step_metrics):
        fn = lambda ep: chunk_gradient(weights, ep, iteration, first_order, step_metrics)
        columns = steps + 1 if learner.reports_inner_steps and step_metrics else 1
        loss, grads, step_loss, step_acc, state = (
            fn(episode) if config.task_chunks == 1 else
            _mean_over_chunks(fn, episode, config.task_chunks, weights, len(variables), columns))
        # Each replica averages over its 1/R share of the meta-batch; dividing by R
        # makes the SUM all-reduce below the mean over all tasks of the global batch.
        grads = [g / replicas for g in grads]
        return loss, grads, step_loss, step_acc, state

    def replica_fn(episode, iteration, first_order, step_metrics):
        # Weights enter the XLA cluster as tensors read on this replica's device: XLA
        # cannot use a mirrored variable's copy that lives on another (logical) device.
        loss, grads, step_loss, step_acc, state = meta_gradient(
            [tf.identity(w) for w in learner.meta_weights()], episode, iteration, first_order,
            step_metrics)
        # All-reduce here, in the replica context, so every replica holds the global values.
        ctx = tf.distribute.get_replica_context()
        grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        loss, step_loss, step_acc, state = ctx.all_reduce(tf.distribute.ReduceOp.MEAN,
                                                          [loss, step_loss, step_acc, state])
        return loss, grads, step_loss, step_acc, state

    def apply(grads, state):
        run.optimizer.apply(grads, variables)
        if state:
            learner.update_state(state)
        return tf.constant(True)

    @tf.function
    def gradients(episode, first_order, step_metrics):
        iteration = tf.cast(run.step, tf.float32)
        reduced = strategy.run(lambda ep, it: replica_fn(ep, it, first_order, step_metrics),
                               args=(episode, iteration))
        # Every replica holds the same all-reduced values: take replica 0's.
        loss, grads, step_loss, step_acc, state = tf.nest.map_structure(
            lambda v: strategy.experimental_local_results(v)[0], reduced)
        grad_norm = tf.linalg.global_norm(grads)
        ok = tf.math.is_finite(loss) & tf.math.is_finite(grad_norm)
        if config.grad_clip > 0:
            grads, _ = tf.clip_by_global_norm(grads, config.grad_clip, use_norm=grad_norm)
        return loss, grads, grad_norm, ok, step_loss, step_acc, state

    # The update is a function of its own: a Keras optimizer's apply() traced into the
    # meta-step's function keeps that whole graph alive for the life of the process (measured:
    # 20-50 MB per run, hundreds of MB with XLA), which a notebook or a test suite that
    # trains many times would accumulate; alone, it keeps a few MB.
    @tf.function
    def update(grads, state, ok):
        # A non-finite update is never applied, so the weights (and every checkpoint) stay
        # finite; the host then fails or skips as --on_nan says.
        tf.cond(ok, lambda: apply(grads, state), lambda: tf.constant(False))
        run.step.assign_add(1)

    def setting(first_order, step_metrics):
        # A learner without inner steps scores its queries once either way: one program.
        return (learner.first_order if first_order is None else first_order,
                step_metrics or not learner.reports_inner_steps)

    def train_step(episode, first_order=None, step_metrics=True):
        first_order, step_metrics = setting(first_order, step_metrics)
        loss, grads, grad_norm, ok, step_loss, step_acc, state = gradients(
            episode, first_order, step_metrics)
        update(grads, state, ok)
        out = {"loss": loss, "grad_norm": grad_norm, "nonfinite": 1.0 - tf.cast(ok, tf.float32)}
        if step_metrics:
            out["step_loss"] = step_loss
            if not config.is_regression:
                out["step_accuracy"] = step_acc
        return out

    def compile_setting(episode, first_order=None, step_metrics=True):
        float(gradients(episode, *setting(first_order, step_metrics))[0])

    # Timing (benchmarks, the first iteration) compiles a setting without applying it.
    train_step.compile = compile_setting  # type: ignore[attr-defined]
    return train_step


def _mean_over_chunks(fn, episode, chunks: int, weights, trained: int, columns: int):
    """The mean of ``fn`` over ``chunks`` equal slices of the episode's tasks, computed one
    slice after another in a while loop, so that only one slice's activations are alive
    (the peak memory of the second-order step shrinks with the chunk size)."""
    parts = tf.nest.map_structure(
        lambda t: None if t is None else tf.reshape(t, [chunks, -1] + t.shape.as_list()[1:]),
        episode)

    def body(i, acc):
        out = fn(tf.nest.map_structure(lambda t: None if t is None else t[i], parts))
        return i + 1, tf.nest.map_structure(lambda a, o: a + o / chunks, acc, out)

    zeros = [tf.zeros([]), [tf.zeros_like(w) for w in weights[:trained]], tf.zeros([columns]),
             tf.zeros([columns]), [tf.zeros_like(w) for w in weights[trained:]]]
    _, acc = tf.while_loop(lambda i, _: i < chunks, body, (tf.constant(0), zeros))
    return acc
