"""iMAML (Rajeswaran et al. 2019): a proximal inner loop and the implicit meta-gradient."""

from __future__ import annotations

import tensorflow as tf

from maml_tf.meta_learner import MetaLearner, _stack


class IMAML(MetaLearner):
    """Implicit MAML (Rajeswaran et al. 2019).

    Inner loop: ``steps`` gradient steps (rate ``inner_lr``) on the proximal objective
    ``L_support(phi) + lam / 2 * ||phi - theta||^2`` from ``phi = theta``, with no outer tape
    through it. Meta-gradient: with ``phi*`` the adapted weights, ``g = grad L_query(phi*)``
    and ``H`` the Hessian of ``L_support`` at ``phi*``, the implicit Jacobian gives
    ``d L_query / d theta = (I + H / lam)^-1 g``, solved by ``cg_steps`` iterations of
    conjugate gradient on Hessian-vector products (double backpropagation through one support
    pass), per task, all tasks at once. ``cg_damping`` and ``lam_damping`` (both 0 by default)
    solve ``((1 + cg_damping) I + H / (lam + lam_damping)) v = g`` instead, as the authors'
    code does (``imaml_dev``'s ``matrix_evaluator``: 1 and 10 with their Omniglot command),
    which pulls the meta-gradient towards the first-order ``g / (1 + cg_damping)``. Nothing of
    the inner loop is kept for a backward pass; memory grows with the inner steps only by each
    step's fast weights, kept for the per-step query metrics (measured in
    ``benchmarks/README.md``).

    The implicit gradient is exact when the inner problem is solved exactly (``phi*`` its
    minimiser) and CG has converged; both are measured in
    ``tests/optimization_learners_test.py``, and the damped system against its closed form.

    Args:
      lam: the proximal regularisation strength lambda (> 0).
      cg_steps: conjugate-gradient iterations (the paper uses 5).
      cg_damping: added to the identity of the implicit system (>= 0; 0 is exact).
      lam_damping: added to lambda where it divides the Hessian (>= 0; 0 is exact).
    """

    def __init__(self, model, *, lam: float = 1.0, cg_steps: int = 5, cg_damping: float = 0.0,
                 lam_damping: float = 0.0, **kwargs):
        super().__init__(model, **kwargs)
        if not lam > 0:
            raise ValueError(f"iMAML needs lam > 0, got {lam}.")
        if cg_steps < 1:
            raise ValueError(f"iMAML needs cg_steps >= 1, got {cg_steps}.")
        if not (cg_damping >= 0 and lam_damping >= 0):
            raise ValueError(f"iMAML needs cg_damping >= 0 and lam_damping >= 0, got "
                             f"{cg_damping} and {lam_damping}.")
        if self.inner_optimizer != "sgd":
            raise ValueError("iMAML's inner loop is gradient descent on the proximal objective: "
                             "use inner_optimizer='sgd'.")
        self.lam = float(lam)
        self.cg_steps = int(cg_steps)
        self.cg_damping = float(cg_damping)
        self.lam_damping = float(lam_damping)

    # The inner optimizer's "state" is the anchor theta (per task) of the proximal term.
    def init_inner_state(self, params):
        return [tf.stop_gradient(p) for p in params]

    def inner_update(self, params, grads, state, extra, step):
        lam = self.lam
        grads = [g + tf.cast(lam, p.dtype) * (p - anchor)
                 for p, g, anchor in zip(params, grads, state)]
        return super().inner_update(params, grads, [], extra, step)[0], state

    def inner_loop(self, weights, x, y, steps, first_order=None):
        # Never an outer tape through the inner loop: the meta-gradient is implicit.
        return super().inner_loop(weights, x, y, steps, first_order=True)

    def meta_step(self, weights, episode, steps, iteration=None, first_order=None,
                  track_steps=True):
        trajectory = self.inner_loop(weights, episode.support_x, episode.support_y, steps)
        phi = [tf.stop_gradient(p) for p in trajectory[-1]]
        net_weights, extra = self.split(weights)
        with tf.GradientTape() as tape:
            tape.watch(phi)
            query_loss, query_metric = self.query_metrics(phi, episode.query_x,
                                                          episode.query_y, extra, steps)
            total = tf.reduce_sum(query_loss)
        g = tape.gradient(total, phi, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        v = self.implicit_solve(phi, episode.support_x, episode.support_y, g, extra)
        num_tasks = episode.support_x.shape[0]
        # The meta-loss is the mean over tasks: each task's implicit gradient, averaged.
        grads = [tf.cast(tf.reduce_sum(vi, 0) / num_tasks, w.dtype)
                 for vi, w in zip(v, net_weights)]
        # The last step's query pass is the one above: only the earlier steps are scored here.
        losses, metrics = self._score(trajectory[:-1], episode, extra, True) if track_steps \
            else ([], [])
        per_step = _stack(losses + [query_loss], metrics + [query_metric])
        loss = tf.reduce_mean(query_loss)
        return loss, grads + [tf.zeros_like(e) for e in extra], per_step

    def hvp(self, phi, x, y, vectors, extra=()):
        """Per-task Hessian-vector products of the support loss at ``phi``: ``H_t v_t`` for
        every task t, each ``[T, *shape]`` (the tasks' losses are independent, so the Hessian
        of their sum is block-diagonal by task)."""
        with tf.GradientTape() as outer:
            outer.watch(phi)
            with tf.GradientTape() as inner:
                inner.watch(phi)
                total = tf.reduce_sum(self.loss_fn(self.forward_at(phi, x, extra, 0), y))
            grads = inner.gradient(total, phi,
                                   unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return outer.gradient(grads, phi, output_gradients=vectors,
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def implicit_solve(self, phi, x, y, g, extra=()):
        """``((1 + cg_damping) I + H_t / (lam + lam_damping))^-1 g_t`` for each task t by
        conjugate gradient (``cg_steps`` iterations from 0); ``phi``, ``g`` and the result are
        lists of ``[T, *shape]``."""
        inv_lam = 1.0 / (self.lam + self.lam_damping)
        diagonal = 1.0 + self.cg_damping

        def dot(a, b):                                            # per task: [T]
            return tf.add_n([tf.reduce_sum(tf.reshape(ai * bi, [ai.shape[0], -1]), 1)
                             for ai, bi in zip(a, b)])

        def per_task(s, a):                                       # [T] * [T, ...]
            return [tf.reshape(s, [-1] + [1] * (ai.shape.rank - 1)) * ai for ai in a]

        def apply_a(v):
            hv = self.hvp(phi, x, y, v, extra)
            return [diagonal * vi + inv_lam * h for vi, h in zip(v, hv)]

        v = [tf.zeros_like(gi) for gi in g]
        r = list(g)
        p = list(g)
        rr = dot(r, r)
        for _ in range(self.cg_steps):
            ap = apply_a(p)
            pap = dot(p, ap)
            # A task whose residual is already zero keeps its solution (no 0/0).
            alpha = tf.math.divide_no_nan(rr, pap)
            v = [vi + ai for vi, ai in zip(v, per_task(alpha, p))]
            r = [ri - ai for ri, ai in zip(r, per_task(alpha, ap))]
            rr_new = dot(r, r)
            beta = tf.math.divide_no_nan(rr_new, rr)
            p = [ri + bi for ri, bi in zip(r, per_task(beta, p))]
            rr = rr_new
        return v
