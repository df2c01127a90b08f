"""BOIL, CAVIA and iMAML: each one's own exact check (beyond the shared learner contract).

BOIL and CAVIA are identities with an independent computation (MAML with the head's
inner rate at zero; a hand-written MAML on the context vector), plus float64 finite
differences. iMAML is checked against the closed form of a quadratic problem and against
finite differences of the exactly solved proximal problem.
"""

import numpy as np
import tensorflow as tf
import keras

from algorithms_test import (TASKS, _config, _episode, _fd_check, _loss_and_grads, _Masked,
                             _sinusoid_episode)
from maml_tf.algorithms import IMAML, build_learner
from maml_tf.algorithms.cavia import film
from maml_tf.config import Config
from maml_tf.data.episode import Episode
from maml_tf.models import get_model
from maml_tf.models import layers as L


def _float64_sinusoid(algorithm, scale=0.3, **kw):
    """A float64 sinusoid learner with O(1) random weights (well away from ReLU kinks' scale
    of the default tiny init)."""
    config = Config.from_dict({"dataset": "sinusoid", "algorithm": algorithm, "inner_lr": 0.01,
                               **kw})
    learner = build_learner(config, get_model(config, dtype="float64"))
    rng = np.random.default_rng(1)
    for v in learner.net.variables:
        v.assign(scale * rng.normal(size=v.shape))
    return learner


class BoilTest(tf.test.TestCase):

    def test_the_head_never_moves_in_the_inner_loop(self):
        learner = build_learner(_config("boil"), get_model(_config("boil")))
        ep = _episode()
        fast = learner.adapt(ep.support_x, ep.support_y, steps=3)
        meta = learner.meta_weights()
        nb = learner.num_body
        self.assertEqual(nb, len(meta) - 1 - 1)      # conv4: the head is a Dense (kernel, bias)
        for w, f in zip(meta[nb:], fast[nb:]):
            self.assertAllEqual(np.broadcast_to(w.numpy(), f.shape), f.numpy())
        moved = [float(tf.reduce_max(tf.abs(f - w))) for w, f in zip(meta[:nb], fast[:nb])]
        self.assertGreater(min(m for m in moved if m > 0), 0)
        self.assertGreater(sum(m > 0 for m in moved), nb // 2)

    def test_equals_maml_with_the_head_frozen_in_the_inner_loop(self):
        config = _config("boil")
        model = get_model(config)
        boil = build_learner(config, model)
        masked = _Masked(model, inner_lr=config.inner_lr,
                         frozen=range(boil.num_body, len(boil.net.variables)))
        ep = _episode(1)
        loss_b, grads_b = _loss_and_grads(boil, boil.meta_weights(), ep, 2)
        loss_m, grads_m = _loss_and_grads(masked, masked.meta_weights(), ep, 2)
        self.assertAllClose(loss_b, loss_m, rtol=1e-6)
        for a, b in zip(grads_b, grads_m):
            self.assertAllClose(a, b, rtol=1e-4, atol=1e-7)

    def test_meta_gradient_matches_finite_differences(self):
        learner = _float64_sinusoid("boil")
        _fd_check(self, learner, _sinusoid_episode(), 2, index=0)


class CaviaTest(tf.test.TestCase):

    def test_equals_maml_restricted_to_the_context_vector(self):
        # An independent, hand-written MAML whose only fast parameter is the context c:
        # c_0 = 0, c_{k+1} = c_k - alpha * d L_support / d c, meta-loss L_query(c_S), with
        # the network weights meta-learned through both passes.
        learner = _float64_sinusoid("cavia", context_dim=3, inner_lr=0.1)
        ep = _sinusoid_episode(2)
        weights = [tf.constant(w) for w in learner.meta_weights()]

        def net(w, x, c):
            h = tf.concat([x, tf.broadcast_to(c, [x.shape[0], 3])], -1)
            h = tf.nn.relu(h @ w[0] + w[1])
            h = tf.nn.relu(h @ w[2] + w[3])
            return h @ w[4] + w[5]

        def reference(w):
            losses = []
            for t in range(TASKS):
                c = tf.zeros([3], tf.float64)
                for _ in range(2):
                    with tf.GradientTape() as tape:
                        tape.watch(c)
                        inner = tf.reduce_mean(tf.square(net(w, ep.support_x[t], c)
                                                         - ep.support_y[t]))
                    c = c - 0.1 * tape.gradient(inner, c)
                losses.append(tf.reduce_mean(tf.square(net(w, ep.query_x[t], c) - ep.query_y[t])))
            return tf.reduce_mean(losses)

        with tf.GradientTape() as tape:
            tape.watch(weights)
            expected = reference(weights)
        expected_grads = tape.gradient(expected, weights)
        loss, grads = _loss_and_grads(learner, weights, ep, 2)
        self.assertAllClose(loss, float(expected), rtol=1e-12)
        for a, b in zip(grads, expected_grads):
            self.assertAllClose(a, b.numpy(), rtol=1e-10, atol=1e-14)

    def test_only_the_context_adapts_and_it_starts_at_zero(self):
        learner = _float64_sinusoid("cavia", context_dim=2, inner_lr=0.1)
        ep = _sinusoid_episode()
        trajectory = learner.inner_loop(learner.meta_weights(), ep.support_x, ep.support_y, 2)
        self.assertAllEqual(trajectory[0][-1], np.zeros((TASKS, 2)))
        self.assertGreater(float(tf.reduce_max(tf.abs(trajectory[-1][-1]))), 0)
        for w, f in zip(learner.meta_weights(), trajectory[-1][:-1]):
            self.assertAllEqual(np.broadcast_to(w.numpy(), f.shape), f.numpy())

    def test_meta_gradient_matches_finite_differences(self):
        learner = _float64_sinusoid("cavia", context_dim=2, inner_lr=0.1)
        _fd_check(self, learner, _sinusoid_episode(), 3, index=0)

    def test_images_get_film_at_the_third_normalisation_layer(self):
        config = _config("cavia", context_dim=3)
        learner = build_learner(config, get_model(config))
        self.assertEqual(learner.net.model.input_shape[1:], (28, 28, 1))
        self.assertEqual(learner.film_layer, "batchnorm2")
        self.assertEqual([e.shape for e in learner.extra], [(3, 8), (3, 8)])
        h = tf.random.uniform([2, 5, 4, 4, 8])
        c = tf.constant([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]])
        scale, shift = tf.random.normal([3, 8]), tf.random.normal([3, 8])
        out = film(h, c, scale, shift).numpy()
        self.assertAllClose(out[0], h[0])                        # zero context: identity
        g, b = (c[1:] @ scale).numpy()[0], (c[1:] @ shift).numpy()[0]
        self.assertAllClose(out[1], h[1].numpy() * (1 + g) + b, rtol=1e-6)
        # The context moves the network's outputs: its inner gradient is not zero.
        ep = _episode()
        grads, _ = learner.support_grads(
            learner.initial_fast_weights(learner.meta_weights()[:len(learner.net.variables)],
                                         TASKS, learner.extra),
            ep.support_x, ep.support_y, False, learner.extra)
        self.assertGreater(float(tf.reduce_max(tf.abs(grads[-1]))), 0)

    def test_film_meta_gradient_matches_finite_differences(self):
        config = _config("cavia", context_dim=2, inner_lr=0.1)
        learner = build_learner(config, get_model(config, dtype="float64"))
        ep = _episode(0, dtype="float64")
        n = len(learner.net.variables)
        _fd_check(self, learner, ep, 2, index=0)          # the first conv kernel
        _fd_check(self, learner, ep, 2, index=n)          # the FiLM scale matrix


def _linear_regression_tasks(seed, d=4, n=6):
    rng = np.random.default_rng(seed)

    def part():
        x = rng.normal(size=(TASKS, n, d))
        w = rng.normal(size=(TASKS, d, 1))
        return tf.constant(x), tf.constant(x @ w + 0.1 * rng.normal(size=(TASKS, n, 1)))
    return Episode(*part(), *part())


class ImamlTest(tf.test.TestCase):

    def test_implicit_gradient_equals_the_closed_form_on_a_quadratic_problem(self):
        self._check_quadratic(cg_damping=0.0, lam_damping=0.0)

    def test_damped_implicit_gradient_equals_its_closed_form(self):
        # The authors' code's system: ((1 + cg_damping) I + H / (lam + lam_damping)) v = g.
        self._check_quadratic(cg_damping=1.0, lam_damping=10.0)

    def _check_quadratic(self, cg_damping, lam_damping):
        # Linear regression: L_s(phi) = |X phi - y|^2 / n is quadratic with Hessian
        # A = 2 X^T X / n, so the proximal solution and its Jacobian have closed forms:
        # phi* = (A + lam I)^-1 (2 X^T y / n + lam theta), d phi*/d theta = (I + A / lam)^-1.
        d, lam = 4, 2.0
        model = keras.Sequential([keras.Input((d,), dtype="float64"),
                                  L.Dense(1, use_bias=False, dtype="float64")])
        model.layers[0].kernel.assign(np.random.default_rng(0).normal(size=(d, 1)))
        # cg_steps = d: conjugate gradient is exact in d iterations on a d-dimensional system.
        learner = IMAML(model, inner_lr=0.1, inner_steps=300, loss="mse", metric=None,
                        lam=lam, cg_steps=d, cg_damping=cg_damping, lam_damping=lam_damping)
        ep = _linear_regression_tasks(0, d)
        theta = model.layers[0].kernel.numpy()
        expected_grad, expected_loss = np.zeros_like(theta), 0.0
        for t in range(TASKS):
            x, y = ep.support_x[t].numpy(), ep.support_y[t].numpy()
            xq, yq = ep.query_x[t].numpy(), ep.query_y[t].numpy()
            a = 2 * x.T @ x / len(x)
            phi = np.linalg.solve(a + lam * np.eye(d), 2 * x.T @ y / len(x) + lam * theta)
            g = 2 * xq.T @ (xq @ phi - yq) / len(xq)
            system = (1 + cg_damping) * np.eye(d) + a / (lam + lam_damping)
            expected_grad += np.linalg.solve(system, g) / TASKS
            expected_loss += np.mean((xq @ phi - yq) ** 2) / TASKS
        loss, grads = _loss_and_grads(learner, learner.meta_weights(), ep, 300)
        self.assertAllClose(loss, expected_loss, rtol=1e-10)
        self.assertAllClose(grads[0], expected_grad, rtol=1e-8, atol=1e-12)

    def test_implicit_gradient_approaches_finite_differences_as_cg_iterations_grow(self):
        # A small tanh network (float64; smooth, so that gradient descent can solve the
        # proximal problem to rounding, which ReLU kinks prevent). With the inner problem
        # solved (its gradient vanishes), finite differences of the meta-loss measure the exact
        # implicit gradient, and CG's error must shrink towards them.
        steps, lam = 300, 2.0
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((1,), dtype="float64")] + [
            keras.layers.Dense(20, activation="tanh", dtype="float64") for _ in range(2)]
            + [keras.layers.Dense(1, dtype="float64")])
        learner = IMAML(model, inner_lr=0.05, inner_steps=steps, loss="mse", metric=None,
                        lam=lam)
        ep = _sinusoid_episode(3)
        weights = [tf.constant(w) for w in learner.meta_weights()]
        phi = learner.inner_loop(weights, ep.support_x, ep.support_y, steps)[-1]
        grads, _ = learner.support_grads(phi, ep.support_x, ep.support_y, True)
        proximal = [g + lam * (p - w) for g, p, w in zip(grads, phi, weights)]
        self.assertLess(max(float(tf.reduce_max(tf.abs(g))) for g in proximal), 1e-10)

        rng = np.random.default_rng(0)
        direction = [rng.normal(size=w.shape) for w in weights]
        eps = 1e-6

        def loss_at(sign):
            moved = [w + sign * eps * v for w, v in zip(weights, direction)]
            return float(learner.meta_loss(moved, ep, steps)[0])
        numeric = (loss_at(1) - loss_at(-1)) / (2 * eps)
        errors = []
        for cg in (1, 3, 30):
            learner.cg_steps = cg
            _, grads = _loss_and_grads(learner, weights, ep, steps)
            analytic = sum(float(np.sum(g * v)) for g, v in zip(grads, direction))
            errors.append(abs(analytic - numeric) / abs(numeric))
        self.assertLess(errors[-1], 1e-6)
        self.assertGreater(errors[0], 10 * errors[-1])
        self.assertLessEqual(errors[-1], errors[1])

    def test_inner_steps_minimise_the_proximal_objective(self):
        learner = _float64_sinusoid("imaml", imaml_lambda=1.0)
        ep = _sinusoid_episode(4)
        weights = learner.meta_weights()
        trajectory = learner.inner_loop(weights, ep.support_x, ep.support_y, 3)
        # One step by hand: phi_1 = theta - alpha * grad L_s(theta) (the proximal term is 0).
        grads, _ = learner.support_grads(trajectory[0], ep.support_x, ep.support_y, True)
        for p0, g, p1 in zip(trajectory[0], grads, trajectory[1]):
            self.assertAllClose(p1, p0 - 0.01 * g, rtol=1e-12)
        # The second step pulls back towards theta.
        grads, _ = learner.support_grads(trajectory[1], ep.support_x, ep.support_y, True)
        for p1, g, p2, w in zip(trajectory[1], grads, trajectory[2], weights):
            self.assertAllClose(p2, p1 - 0.01 * (g + 1.0 * (p1 - w)), rtol=1e-12)
