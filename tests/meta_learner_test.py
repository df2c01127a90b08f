"""Exactness of MAML's meta-gradient: finite differences, a closed form, and the traps."""

import numpy as np
import pytest
import tensorflow as tf
import keras
from absl.testing import parameterized

from maml_tf.data.episode import Episode
from maml_tf.meta_learner import MetaLearner
from maml_tf.models import zoo
from maml_tf.models.functional import FunctionalModel


def _classification_episode(rng, tasks, n, image_shape, way, dtype="float64"):
    def part():
        x = rng.normal(size=(tasks, n) + tuple(image_shape)).astype(dtype)
        y = rng.integers(0, way, size=(tasks, n)).astype("int32")
        return tf.constant(x), tf.constant(y)
    sx, sy = part()
    qx, qy = part()
    return Episode(sx, sy, qx, qy)


def _regression_episode(rng, tasks, n, dim=1, dtype="float64"):
    def part():
        x = rng.uniform(-5, 5, size=(tasks, n, dim)).astype(dtype)
        return tf.constant(x), tf.constant(np.sin(x).sum(-1, keepdims=True))
    sx, sy = part()
    qx, qy = part()
    return Episode(sx, sy, qx, qy)


def _meta_grad_and_fd(learner, episode, steps, directions=6, eps=1e-5, seed=0):
    """Returns (g.v, finite-difference g.v) along random unit directions v."""
    weights = [tf.constant(w) for w in learner.net.meta_weights()]
    with tf.GradientTape() as tape:
        tape.watch(weights)
        loss, _ = learner.meta_loss(weights, episode, steps)
    grads = tape.gradient(loss, weights)
    rng = np.random.default_rng(seed)
    analytic, numeric = [], []
    for _ in range(directions):
        v = [rng.normal(size=w.shape) for w in weights]
        norm = np.sqrt(sum((x ** 2).sum() for x in v))
        v = [x / norm for x in v]
        plus = [w + eps * d for w, d in zip(weights, v)]
        minus = [w - eps * d for w, d in zip(weights, v)]
        lp, _ = learner.meta_loss(plus, episode, steps)
        lm, _ = learner.meta_loss(minus, episode, steps)
        numeric.append((lp.numpy() - lm.numpy()) / (2 * eps))
        analytic.append(sum(float(tf.reduce_sum(g * d)) for g, d in zip(grads, v)))
    return np.array(analytic), np.array(numeric), grads


class _KerasOwnCall(FunctionalModel):
    """The model's own Keras call (``stateless_call``), task by task."""

    def apply(self, params, x, training=None, **_):
        return self._per_task_model(params, x, True)


def _max_rel_error(a, b):
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-8)))


class MetaGradientTest(tf.test.TestCase, parameterized.TestCase):

    def _mlp_learner(self, first_order=False, inner_lr=0.01):
        model = zoo.mlp(1, [40, 40], 1, dtype="float64")
        return MetaLearner(model, loss="mse", inner_lr=inner_lr, first_order=first_order)

    def _conv_learner(self, pool="stride", norm="batch"):
        model = zoo.conv4((8, 8, 2), 3, filters=4, pool=pool, blocks=2, dtype="float64",
                          norm=norm)
        return MetaLearner(model, inner_lr=0.4)

    @parameterized.parameters(1, 3)
    def test_mlp_meta_gradient_matches_finite_differences(self, steps):
        learner = self._mlp_learner()
        ep = _regression_episode(np.random.default_rng(1), tasks=3, n=10)
        analytic, numeric, _ = _meta_grad_and_fd(learner, ep, steps)
        self.assertLess(_max_rel_error(analytic, numeric), 1e-6)

    @parameterized.parameters(("stride", "batch"), ("max", "batch"), ("stride", "layer"))
    def test_conv_norm_meta_gradient_matches_finite_differences(self, pool, norm):
        learner = self._conv_learner(pool, norm)
        ep = _classification_episode(np.random.default_rng(2), 2, 6, (8, 8, 2), 3)
        analytic, numeric, _ = _meta_grad_and_fd(learner, ep, steps=2)
        self.assertLess(_max_rel_error(analytic, numeric), 1e-6)

    def test_keras_batchnorm_is_exact_here_but_not_through_its_own_call(self):
        """maml_tf runs keras.layers.BatchNormalization with the exact math; the layer's own
        call (task by task, as a naive port would) is wrong at second order: the test
        detects that trap."""
        def build(bn):
            inp = keras.Input((5,), dtype="float64")
            h = keras.layers.Dense(16, dtype="float64")(inp)
            if bn:
                h = keras.layers.BatchNormalization(dtype="float64")(h)
            h = keras.layers.Activation("tanh", dtype="float64")(h)
            return keras.Model(inp, keras.layers.Dense(3, dtype="float64")(h))
        ep = _classification_episode(np.random.default_rng(3), 2, 8, (5,), 3)
        errors = {}
        for bn in (False, True):
            model = build(bn)
            for name, net in (("exact", FunctionalModel(model)), ("keras", _KerasOwnCall(model))):
                learner = MetaLearner(net, inner_lr=0.5)
                a, n, _ = _meta_grad_and_fd(learner, ep, steps=2)
                errors[bn, name] = _max_rel_error(a, n)
        self.assertLess(errors[False, "exact"], 1e-6)
        self.assertLess(errors[False, "keras"], 1e-6)
        self.assertLess(errors[True, "exact"], 1e-6)
        self.assertGreater(errors[True, "keras"], 1e-5)

    def test_first_order_differs_exactly_by_the_hessian_term(self):
        """Linear regression: second order = (I - a H_s) g_q, first order = g_q."""
        rng = np.random.default_rng(4)
        alpha, d, ns, nq = 0.05, 3, 7, 9
        ep = _regression_episode(rng, tasks=1, n=ns, dim=d)
        ep = ep._replace(query_x=tf.constant(rng.normal(size=(1, nq, d))),
                         query_y=tf.constant(rng.normal(size=(1, nq, 1))))
        results = {}
        net = FunctionalModel(zoo.mlp(d, [], 1, dtype="float64"))
        theta = np.concatenate([w.numpy().ravel() for w in net.meta_weights()])
        for fo in (False, True):
            learner = MetaLearner(net, loss="mse", inner_lr=alpha, first_order=fo)
            weights = [tf.constant(w) for w in net.meta_weights()]
            with tf.GradientTape() as tape:
                tape.watch(weights)
                loss, _ = learner.meta_loss(weights, ep, 1)
            results[fo] = np.concatenate([g.numpy().ravel() for g in tape.gradient(loss, weights)])
        phi = lambda x: np.concatenate([x[0], np.ones((x.shape[1], 1))], axis=1)
        ps, pq = phi(ep.support_x.numpy()), phi(ep.query_x.numpy())
        ys, yq = ep.support_y.numpy()[0], ep.query_y.numpy()[0]
        hs = 2.0 / ns * ps.T @ ps
        theta_c = theta[:, None]
        adapted = theta_c - alpha * 2.0 / ns * ps.T @ (ps @ theta_c - ys)
        gq = (2.0 / nq * pq.T @ (pq @ adapted - yq)).ravel()
        self.assertAllClose(results[True], gq, rtol=1e-10, atol=1e-12)
        self.assertAllClose(results[False], (np.eye(d + 1) - alpha * hs) @ gq,
                            rtol=1e-10, atol=1e-12)
        self.assertAllClose(results[False] - results[True], -alpha * hs @ gq,
                            rtol=1e-9, atol=1e-12)

    def test_inner_steps_lower_support_loss_and_gradient_reaches_every_weight(self):
        learner = self._conv_learner()
        ep = _classification_episode(np.random.default_rng(5), 2, 6, (8, 8, 2), 3)
        weights = [tf.constant(w) for w in learner.net.meta_weights()]
        traj = learner.inner_loop(weights, ep.support_x, ep.support_y, steps=3)
        support = [float(tf.reduce_mean(learner.loss_fn(learner.net.apply(p, ep.support_x),
                                                       ep.support_y))) for p in traj]
        self.assertTrue(all(b < a for a, b in zip(support, support[1:])), support)
        _, _, grads = _meta_grad_and_fd(learner, ep, steps=1, directions=0)
        for name, g in zip(learner.net.names, grads):
            self.assertGreater(float(tf.reduce_max(tf.abs(g))), 0.0, name)

    def test_batched_path_equals_per_task_keras_call(self):
        """The task-batched forward equals calling the Keras model on each task."""
        model = zoo.conv4((28, 28, 1), 5, filters=8, pool="max", dtype="float64")
        net = FunctionalModel(model)
        self.assertTrue(net.batched)
        x = tf.constant(np.random.default_rng(6).normal(size=(3, 4, 28, 28, 1)))
        params = [tf.stack([w] * 3) for w in net.meta_weights()]
        batched = net.apply(params, x)
        for t in range(3):
            self.assertAllClose(batched[t], model(x[t], training=True), rtol=1e-10)


if __name__ == "__main__":
    tf.test.main()


def _global_rel(a, b):
    num = np.sqrt(sum(float(tf.reduce_sum((tf.cast(x, tf.float64) - tf.cast(y, tf.float64)) ** 2))
                      for x, y in zip(a, b)))
    return num / np.sqrt(sum(float(tf.reduce_sum(tf.cast(x, tf.float64) ** 2)) for x in a))


@pytest.mark.isolated
class CompiledMetaGradientTest(tf.test.TestCase, parameterized.TestCase):
    """The training step runs in tf.function/XLA: it must compute the same meta-gradient.

    Errors are global (norm over all weights): the conv and dense biases that feed batch
    norm have an exactly zero true gradient, so per-tensor relative errors are noise.
    """

    def _setup(self, dtype, recompute=False, pool="stride"):
        keras.utils.set_random_seed(7)
        model = zoo.conv4((12, 12, 1), 5, filters=8, pool=pool, blocks=3, dtype=dtype)
        learner = MetaLearner(model, inner_lr=0.4, recompute=recompute)
        ep = _classification_episode(np.random.default_rng(8), 3, 5, (12, 12, 1), 5, dtype)
        return learner, ep

    @staticmethod
    def _grad_fn(learner, ep, steps):
        def fn(weights):
            with tf.GradientTape() as tape:
                tape.watch(weights)
                loss, _ = learner.meta_loss(weights, ep, steps)
            return tape.gradient(loss, weights)
        return fn

    @parameterized.parameters((False, "stride"), (True, "stride"), (True, "max"))
    def test_graph_and_xla_equal_eager_in_float64(self, jit, pool):
        learner, ep = self._setup("float64", pool=pool)
        fn = self._grad_fn(learner, ep, 2)
        weights = [tf.constant(w) for w in learner.net.meta_weights()]
        self.assertLess(_global_rel(fn(weights), tf.function(fn, jit_compile=jit)(weights)), 1e-12)

    def test_recompute_gives_the_same_meta_gradient(self):
        plain, ep = self._setup("float64")
        rec, _ = self._setup("float64", recompute=True)
        weights = [tf.constant(w) for w in plain.net.meta_weights()]
        for jit in (False, True):
            a = tf.function(self._grad_fn(plain, ep, 3), jit_compile=jit)(weights)
            b = tf.function(self._grad_fn(rec, ep, 3), jit_compile=jit)(weights)
            self.assertLess(_global_rel(a, b), 1e-12)

    @parameterized.parameters("stride", "max")
    def test_float32_xla_meta_gradient_agrees_with_float64(self, pool):
        """Also guards the max-pool trap: XLA's MaxPool second derivative is wrong in float32."""
        l64, ep64 = self._setup("float64", pool=pool)
        l32, _ = self._setup("float32", pool=pool)
        ep32 = Episode(*(tf.cast(t, tf.float32) if t.dtype == tf.float64 else t for t in ep64[:4]))
        w64 = [tf.constant(w) for w in l64.net.meta_weights()]
        w32 = [tf.cast(w, tf.float32) for w in w64]
        g64 = self._grad_fn(l64, ep64, 1)(w64)
        g32 = tf.function(self._grad_fn(l32, ep32, 1), jit_compile=True)(w32)
        self.assertLess(_global_rel(g64, g32), 1e-5)


@pytest.mark.isolated
class MixedPrecisionTest(tf.test.TestCase):

    def test_mixed_precision_meta_gradients_are_finite_and_close_to_float32(self):
        # Both low-precision types against one float32 reference (one process and one compile
        # fewer than a test per type).
        keras.utils.set_random_seed(3)
        model = zoo.conv4((14, 14, 1), 5, filters=8, blocks=3)
        ep = _classification_episode(np.random.default_rng(9), 4, 5, (14, 14, 1), 5, "float32")
        grads = {}
        for cdt in (None, "bfloat16", "float16"):
            learner = MetaLearner(model, inner_lr=0.4, compute_dtype=cdt)

            @tf.function(jit_compile=True)
            def meta_grad(weights):
                with tf.GradientTape() as tape:
                    tape.watch(weights)
                    loss, _ = learner.meta_loss(weights, ep, 2)
                return tape.gradient(loss, weights)
            grads[cdt] = meta_grad([tf.constant(w) for w in learner.net.meta_weights()])
        flat = lambda gs: np.concatenate([g.numpy().ravel() for g in gs])
        for dtype in ("bfloat16", "float16"):
            for g in grads[dtype]:
                self.assertEqual(g.dtype, tf.float32)
                self.assertTrue(np.all(np.isfinite(g.numpy())), dtype)
            a, b = flat(grads[None]), flat(grads[dtype])
            cosine = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
            # Measured: cosine 0.96 (bfloat16) and 0.95 (float16) on this random episode; a
            # wrong cast (e.g. a lost second-order path) gives far lower agreement.
            self.assertGreater(cosine, 0.9, dtype)


@pytest.mark.parametrize("algorithm", ["maml", "protonet", "snail"])
def test_numpy_arrays_and_lists_are_accepted_wherever_an_episode_is(algorithm):
    # numpy's default float64 images and int64 labels, as a user has them: once a crash in
    # losses.py ('numpy.dtypes.Int32DType' object has no attribute 'is_integer').
    from maml_tf.algorithms import build_learner
    from maml_tf.config import Config
    config = Config(dataset="omniglot", way=3, shot=1, query=2, num_filters=4,
                    algorithm=algorithm)
    learner = build_learner(config, zoo.conv4((28, 28, 1), 3, filters=4))
    rng = np.random.default_rng(0)
    as_numpy = Episode(rng.uniform(size=(2, 3, 28, 28, 1)), np.tile(np.arange(3), (2, 1)),
                       rng.uniform(size=(2, 6, 28, 28, 1)), np.tile(np.repeat(np.arange(3), 2), (2, 1)))
    as_tensors = Episode(*[tf.constant(v, tf.float32 if v.dtype.kind == "f" else tf.int32)
                           for v in as_numpy[:4]])
    loss_a, grads_a = learner.meta_gradient(as_numpy)
    loss_b, grads_b = learner.meta_gradient(as_tensors)
    np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-6)
    np.testing.assert_allclose(learner.evaluate(as_numpy).accuracy.numpy(),
                               learner.evaluate(as_tensors).accuracy.numpy())
    if algorithm == "maml":   # adapt / predict take lists too
        fast = learner.adapt(as_numpy.support_x.tolist(), as_numpy.support_y.tolist())
        np.testing.assert_allclose(learner.predict(fast, as_numpy.query_x).numpy(),
                                   learner.predict(fast, as_tensors.query_x).numpy(), rtol=1e-5)
