"""TRPO's update (Schulman et al. 2015), as rllab's ``ConjugateGradientOptimizer`` that
maml_rl used for the outer loop: conjugate gradient on Hessian-vector products of the KL,
a step scaled to the KL limit, and a backtracking line search.

The functions here work on one flat parameter vector and take the problem as callables,
so the meta-learner decides what the loss, the KL and the Hessian-vector product are (for
MAML, all three differentiate through the inner step).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import tensorflow as tf

DAMPING = 1e-5          # rllab's reg_coeff: F + DAMPING * I keeps CG well posed
BACKTRACK_RATIO = 0.8
MAX_BACKTRACKS = 15


def flatten(tensors) -> tf.Tensor:
    return tf.concat([tf.reshape(t, [-1]) for t in tensors], 0)


def unflatten(flat: tf.Tensor, like) -> list[tf.Tensor]:
    """``flat`` split into tensors shaped as ``like`` (``tf.split``: its derivatives of every
    order exist under XLA, unlike those of slicing)."""
    parts = tf.split(flat, [int(tf.size(t)) for t in like])
    return [tf.reshape(p, t.shape) for p, t in zip(parts, like)]


def conjugate_gradient(matvec: Callable[[tf.Tensor], tf.Tensor], b: tf.Tensor,
                       iterations: int = 10, residual_tol: float = 1e-10) -> tf.Tensor:
    """Approximately solves ``A x = b`` for a symmetric positive-definite ``A`` given as
    ``matvec``, starting from 0 (at most ``iterations`` products)."""
    x = tf.zeros_like(b)
    r = p = b
    rr = tf.tensordot(r, r, 1)
    for _ in range(iterations):
        if float(rr) < residual_tol:
            break
        ap = matvec(p)
        alpha = rr / tf.tensordot(p, ap, 1)
        x, r = x + alpha * p, r - alpha * ap
        rr_new = tf.tensordot(r, r, 1)
        p, rr = r + (rr_new / rr) * p, rr_new
    return x


@dataclasses.dataclass
class StepInfo:
    """What one TRPO update did: the surrogate loss before and after, the KL of the
    accepted step, the fraction of the full step taken (0: none was acceptable, the
    parameters are unchanged) and the backtracks tried."""
    loss_before: float
    loss_after: float
    kl: float
    step_fraction: float
    backtracks: int


def trpo_step(params: tf.Tensor, loss_and_grad: Callable, hvp: Callable, loss_and_kl: Callable,
              max_kl: float, cg_iterations: int = 10) -> tuple[tf.Tensor, StepInfo]:
    """One TRPO update of the flat parameters ``params``.

    loss_and_grad(params) -> (loss, gradient); hvp(params, v) -> the KL's Hessian at
    ``params`` times v; loss_and_kl(params) -> (loss, KL from the policy at the original
    ``params``). The update minimises the loss subject to KL <= max_kl: the direction
    ``x = F^-1 g`` (conjugate gradient on ``F + DAMPING * I``), scaled so the quadratic model
    of the KL equals max_kl, then shrunk by 0.8 until the loss decreases and the KL is
    within the limit (at most 15 tries; otherwise the parameters stay).
    """
    loss_before, grad = loss_and_grad(params)
    matvec = lambda v: hvp(params, v) + DAMPING * v   # noqa: E731
    direction = conjugate_gradient(matvec, grad, cg_iterations)
    curvature = tf.tensordot(direction, matvec(direction), 1)
    full_step = tf.sqrt(2.0 * max_kl / (curvature + 1e-8)) * direction
    loss_before = float(loss_before)
    for n in range(MAX_BACKTRACKS):
        fraction = BACKTRACK_RATIO ** n
        candidate = params - fraction * full_step
        loss, kl = (float(v) for v in loss_and_kl(candidate))
        if loss < loss_before and kl <= max_kl:
            return candidate, StepInfo(loss_before, loss, kl, fraction, n)
    return params, StepInfo(loss_before, loss_before, 0.0, 0.0, MAX_BACKTRACKS)
