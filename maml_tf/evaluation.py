"""Evaluation on fixed, seeded tasks: metrics after 0..S inner steps, mean and 95% CI.

The confidence interval is ``1.96 * std / sqrt(N)`` over the N per-task values (std with
ddof=0, as cbfinn/maml), so numbers are comparable with the paper's tables.
"""

from __future__ import annotations

import numpy as np
from absl import logging
import tensorflow as tf

from maml_tf.meta_learner import MetaLearner
from maml_tf.models.functional import inference


def make_eval_step(learner: MetaLearner, steps: int, strategy: tf.distribute.Strategy,
                   jit_compile: bool, mode: str = "transductive"):
    """Returns ``fn(distributed_episode) -> (loss [T, S+1], accuracy [T, S+1] or None)``,
    gathered over replicas. mode: how queries are normalised (``meta_learner.EVAL_MODES``)."""

    @tf.function(jit_compile=jit_compile)
    def adapt_and_score(weights, episode):
        # Traced in inference mode: dropout off (batch norm keeps per-task statistics).
        with inference():
            m = learner.eval_metrics_in_mode(weights, episode, steps, mode)
        return m.loss, (m.accuracy if m.accuracy is not None else tf.zeros_like(m.loss))

    def replica_fn(episode):
        # Weights enter XLA as tensors read on this replica's device (see train_step.py).
        return adapt_and_score([tf.identity(w) for w in learner.meta_weights()], episode)

    @tf.function
    def step(episode):
        loss, acc = strategy.run(replica_fn, args=(episode,))
        return strategy.gather(loss, axis=0), strategy.gather(acc, axis=0)

    return step


def summarize(values: np.ndarray) -> dict:
    """values ``[N, S+1]`` -> per-step mean and 95% CI half-width over all N tasks.

    A task whose inner loop diverged (a non-finite loss) is not dropped: it makes the
    mean infinite, and ``diverged`` counts such tasks per step, so a table never hides
    them. ``finite_mean`` is the mean over the remaining tasks, for diagnosis only.
    """
    n = values.shape[0]
    finite = np.isfinite(values)
    with np.errstate(invalid="ignore", over="ignore"):
        finite_mean = [float(values[finite[:, k], k].mean()) if finite[:, k].any() else None
                       for k in range(values.shape[1])]
        return {"mean": values.mean(axis=0).tolist(),
                "ci95": (1.96 * values.std(axis=0) / np.sqrt(n)).tolist(),
                "diverged": (~finite).sum(axis=0).tolist(),
                "finite_mean": finite_mean}


def evaluate(eval_step, dataset, num_tasks: int, regression: bool) -> dict:
    """Runs ``eval_step`` over a distributed dataset of exactly ``num_tasks`` tasks."""
    loss_parts, accs = [], []
    for episode in dataset:
        loss, acc = eval_step(episode)
        loss_parts.append(loss.numpy())
        accs.append(acc.numpy())
    losses = np.concatenate(loss_parts)[:num_tasks]
    if losses.shape[0] != num_tasks:
        raise RuntimeError(f"Evaluation saw {losses.shape[0]} tasks, expected {num_tasks}.")
    diverged = int((~np.isfinite(losses[:, -1])).sum())
    if diverged:
        logging.warning("%d of %d evaluation tasks diverged in the inner loop (non-finite "
                        "loss after the last step); they count in the mean.", diverged, num_tasks)
    out = {"num_tasks": num_tasks, "loss": summarize(losses)}
    if not regression:
        out["accuracy"] = summarize(np.concatenate(accs)[:num_tasks])
    return out
