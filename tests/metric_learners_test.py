"""R2-D2, MetaOptNet, Matching and Relation Networks: each one's own exact check (beyond the
shared learner contract): closed forms or an independent solver in numpy, and float64 finite
differences of the gradients that meta-training relies on."""

import numpy as np
import tensorflow as tf

from algorithms_test import WAY, _config, _episode, _fd_check
from maml_tf.algorithms import build_learner
from maml_tf.algorithms.metaoptnet import svm_dual
from maml_tf.algorithms.r2d2 import ridge_solution
from maml_tf.algorithms.relation import relation_pairs
from maml_tf.models import get_model


def _float64_learner(algorithm, **kw):
    config = _config(algorithm, **kw)
    return build_learner(config, get_model(config, dtype="float64"))


def _episode64(seed=0):
    ep = _episode(seed, dtype="float64")
    return ep


def _directional_fd(test, fn, x, eps=1e-6, rtol=1e-6):
    """d fn / d x along a random direction: the tape's against central differences."""
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
    grad = tape.gradient(y, x).numpy()
    v = np.random.default_rng(0).normal(size=x.shape)
    numeric = (float(fn(x + eps * v)) - float(fn(x - eps * v))) / (2 * eps)
    analytic = float(np.sum(grad * v))
    test.assertGreater(abs(analytic), 1e-8)
    test.assertAllClose(analytic, numeric, rtol=rtol, atol=1e-10)


class R2D2Test(tf.test.TestCase):

    def test_ridge_solution_matches_numpy_in_both_forms(self):
        rng = np.random.default_rng(0)
        for n, d in ((10, 32), (40, 8)):          # Woodbury (n < d) and primal (n >= d)
            x = rng.normal(size=(3, n, d))
            labels = rng.integers(0, WAY, size=(3, n)).astype("int32")
            w = ridge_solution(tf.constant(x), tf.constant(labels), WAY, 0.7).numpy()
            for t in range(3):
                y = np.eye(WAY)[labels[t]]
                expected = np.linalg.solve(x[t].T @ x[t] + 0.7 * np.eye(d), x[t].T @ y)
                self.assertAllClose(w[t], expected, rtol=1e-9, atol=1e-12)

    def test_logits_are_the_scaled_ridge_prediction(self):
        learner = _float64_learner("r2d2")
        rng = np.random.default_rng(1)
        zs, zq = rng.normal(size=(2, 10, 16)), rng.normal(size=(2, 7, 16))
        ys = np.tile(np.arange(WAY), 2)[None].repeat(2, 0).astype("int32")
        extra = [tf.constant(v, tf.float64) for v in (np.log(2.0), 3.0, -0.5)]
        logits = learner.head(tf.constant(zs), tf.constant(ys), tf.constant(zq), extra).numpy()
        for t in range(2):
            w = np.linalg.solve(zs[t].T @ zs[t] + 2.0 * np.eye(16), zs[t].T @ np.eye(WAY)[ys[t]])
            self.assertAllClose(logits[t], 3.0 * zq[t] @ w - 0.5, rtol=1e-9)

    def test_gradients_match_finite_differences(self):
        learner = _float64_learner("r2d2")
        ep = _episode64()
        n = len(learner.net.variables)
        _fd_check(self, learner, ep, 0, index=0)          # the first conv kernel
        _fd_check(self, learner, ep, 0, index=n)          # log lambda
        _fd_check(self, learner, ep, 0, index=n + 1)      # the scale


def _numpy_svm(z, labels, way, c, iterations=100000):
    """An independent solver of the same dual: projected gradient descent, row by row onto
    ``{a <= C e_y, sum a = 0}`` (a shifted simplex), float64."""
    n = len(z)
    q = z @ z.T + np.eye(n)
    y = np.eye(way)[labels]
    a = np.zeros((n, way))
    step = 1.0 / np.linalg.eigvalsh(q).max()
    for _ in range(iterations):
        b = c * y - (a - step * (q @ a - y))               # slack, projected onto the simplex
        u = -np.sort(-b, axis=1)
        css = np.cumsum(u, axis=1) - c
        k = np.arange(1, way + 1)
        rho = np.sum(u - css / k > 0, axis=1)
        theta = css[np.arange(n), rho - 1] / rho
        a_new = c * y - np.maximum(b - theta[:, None], 0)
        if np.max(np.abs(a_new - a)) < 1e-15:
            return a_new
        a = a_new
    return a


class MetaOptNetTest(tf.test.TestCase):

    def test_dual_solution_matches_an_independent_solver(self):
        rng = np.random.default_rng(0)
        z = rng.normal(size=(2, 10, 6))
        labels = np.tile(np.arange(WAY), 2)[None].repeat(2, 0).astype("int32")
        ours = svm_dual(tf.constant(z), tf.constant(labels), WAY, 0.1).numpy()
        for t in range(2):
            self.assertAllClose(ours[t], _numpy_svm(z[t], labels[t], WAY, 0.1), atol=1e-10)

    def test_dual_solution_satisfies_the_optimality_conditions(self):
        # Larger, ill-conditioned embeddings (as a trained body gives): the KKT conditions,
        # checked in numpy: feasibility, and on each row the free entries share one gradient
        # value that no entry at its bound exceeds.
        rng = np.random.default_rng(1)
        z = 3.0 * rng.normal(size=(2, 25, 64))
        labels = np.tile(np.arange(WAY), 5)[None].repeat(2, 0).astype("int32")
        a = svm_dual(tf.constant(z), tf.constant(labels), WAY, 0.1).numpy()
        for t in range(2):
            y = np.eye(WAY)[labels[t]]
            grad = (z[t] @ z[t].T + np.eye(25)) @ a[t] - y
            self.assertAllClose(a[t].sum(1), np.zeros(25), atol=1e-12)
            self.assertLessEqual(np.max(a[t] - 0.1 * y), 1e-12)
            at_bound = np.abs(a[t] - 0.1 * y) < 1e-12
            for i in range(25):
                free = grad[i][~at_bound[i]]
                self.assertLess(free.max() - free.min(), 1e-9)
                if at_bound[i].any():
                    self.assertLessEqual(grad[i][at_bound[i]].max(), free.mean() + 1e-9)

    def test_gradient_through_the_solution_matches_finite_differences(self):
        rng = np.random.default_rng(2)
        labels = tf.constant(np.tile(np.arange(WAY), 2)[None].repeat(2, 0).astype("int32"))
        weights = tf.constant(rng.normal(size=(2, 10, WAY)))
        _directional_fd(self, lambda z: tf.reduce_sum(weights * svm_dual(z, labels, WAY, 0.1)),
                        rng.normal(size=(2, 10, 6)))

    def test_meta_gradient_matches_finite_differences(self):
        learner = _float64_learner("metaoptnet")
        _fd_check(self, learner, _episode64(), 0, index=0)
        _fd_check(self, learner, _episode64(), 0, index=len(learner.net.variables))


class MatchingNetTest(tf.test.TestCase):

    def test_one_shot_without_fce_is_a_cosine_nearest_neighbour(self):
        learner = _float64_learner("matching", shot=1)
        rng = np.random.default_rng(0)
        zs, zq = rng.normal(size=(3, WAY, 16)), rng.normal(size=(3, 20, 16))
        ys = np.stack([rng.permutation(WAY) for _ in range(3)]).astype("int32")
        logits = learner.head(tf.constant(zs), tf.constant(ys), tf.constant(zq), []).numpy()
        unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
        cos = np.einsum("tqd,tsd->tqs", unit(zq), unit(zs))
        nearest = np.take_along_axis(ys, cos.argmax(-1), axis=1)
        self.assertAllEqual(logits.argmax(-1), nearest)
        # ... and the probabilities are the softmax attention summed per class.
        attention = np.exp(cos) / np.exp(cos).sum(-1, keepdims=True)
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        expected = np.einsum("tqs,tsk->tqk", attention, np.eye(WAY)[ys])
        self.assertAllClose(probs, expected, rtol=1e-12)

    def test_fce_gradients_match_finite_differences(self):
        learner = _float64_learner("matching", fce=True, fce_steps=2)
        n = len(learner.net.variables)
        ep = _episode64()
        _fd_check(self, learner, ep, 0, index=n)           # forward LSTM kernel
        _fd_check(self, learner, ep, 0, index=n + 6)       # attention LSTM kernel
        _fd_check(self, learner, ep, 0, index=0)           # the body

    def test_fce_reads_the_whole_support_set(self):
        # With FCE, a query's logits depend on every support example (through the LSTMs),
        # where without it the logit of class k depends on class k's examples only.
        learner = _float64_learner("matching", fce=True)
        rng = np.random.default_rng(0)
        dim = learner.extra[0].shape[0]
        zs, zq = rng.normal(size=(1, 10, dim)), rng.normal(size=(1, 4, dim))
        ys = tf.constant(np.tile(np.arange(WAY), 2)[None].astype("int32"))
        before = learner.head(tf.constant(zs), ys, tf.constant(zq), learner.extra).numpy()
        zs[0, 0] += 1.0                                  # an example of class 0 only
        after = learner.head(tf.constant(zs), ys, tf.constant(zq), learner.extra).numpy()
        self.assertTrue(np.all(np.abs(after - before)[..., 1:] > 0))


class RelationNetTest(tf.test.TestCase):

    def test_every_class_query_pair_is_scored_exactly_once(self):
        rng = np.random.default_rng(0)
        classes = rng.normal(size=(2, WAY, 3, 3, 4))
        queries = rng.normal(size=(2, 7, 3, 3, 4))
        pairs = relation_pairs(tf.constant(classes), tf.constant(queries)).numpy()
        self.assertEqual(pairs.shape, (2, 7, WAY, 3, 3, 8))
        for t in range(2):
            seen = set()
            for q in range(7):
                for k in range(WAY):
                    self.assertAllEqual(pairs[t, q, k], np.concatenate([classes[t, k],
                                                                        queries[t, q]], -1))
                    seen.add(pairs[t, q, k].tobytes())
            self.assertLen(seen, 7 * WAY)

    def test_scores_and_loss(self):
        learner = build_learner(_config("relation"), get_model(_config("relation")))
        ep = _episode()
        self.assertEqual(learner.body.apply(
            [w[None] for w in learner.body.meta_weights()], ep.support_x[:1]).shape[2:],
            (2, 2, 8))                                   # feature maps, not vectors
        scores = learner.logits(learner.meta_weights(), ep)
        self.assertEqual(scores.shape, ep.query_y.shape + (WAY,))
        self.assertTrue(np.all((scores.numpy() > 0) & (scores.numpy() < 1)))
        loss, per_step = learner.meta_loss(learner.meta_weights(), ep, 0)
        target = np.eye(WAY)[ep.query_y.numpy()]
        expected = np.mean((scores.numpy() - target) ** 2, axis=(1, 2))
        self.assertAllClose(per_step.loss[:, 0], expected, rtol=1e-6)
        self.assertAllClose(float(loss), expected.mean(), rtol=1e-6)

    def test_meta_gradient_matches_finite_differences(self):
        learner = _float64_learner("relation")
        n = len(learner.net.variables)
        _fd_check(self, learner, _episode64(), 0, index=0)
        _fd_check(self, learner, _episode64(), 0, index=n)     # the module's first conv


def _functional_body(input_shape, num_outputs):
    """The README's ``my_model``, small: conv blocks, global pooling, a Dense head."""
    import keras
    inputs = x = keras.Input(input_shape)
    for _ in range(2):
        x = keras.layers.Conv2D(4, 3, strides=2, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(num_outputs)(x))


def _sequential_body(input_shape, num_outputs):
    import keras
    return keras.Sequential([keras.Input(input_shape)] + [
        layer for _ in range(2) for layer in (
            keras.layers.Conv2D(4, 3, strides=2, padding="same", use_bias=False),
            keras.layers.BatchNormalization(), keras.layers.ReLU())] +
        [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(num_outputs)])


def test_relation_networks_score_feature_maps_for_functional_and_sequential_bodies():
    # A Functional body kept its global pooling and got a Dense relation module; it now drops
    # it, as a Sequential one always did.
    ep = _episode()
    for make in (_functional_body, _sequential_body):
        learner = build_learner(_config("relation"), make((28, 28, 1), WAY))
        maps = learner.body.apply([w[None] for w in learner.body.meta_weights()],
                                  ep.support_x[:1])
        assert maps.shape[2:] == (7, 7, 4), (make.__name__, maps.shape)
        assert any("conv" in v.path for v in learner.relation.variables), make.__name__
        scores = learner.logits(learner.meta_weights(), ep)
        assert scores.shape == ep.query_y.shape + (WAY,)
