"""A user's own Keras model: exact second-order meta-gradients through standard layers
(Functional, Sequential, subclassed), task-batched execution, the public API, refusal
of layers whose second derivative is not known, and ResNet-12."""

import warnings

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import maml_tf
from maml_tf.models import resnet
from maml_tf.models.functional import FunctionalModel, InexactModelError, inference

L = keras.layers
F64 = "float64"


def _episode(seed, tasks=2, n=6, shape=(8, 8, 2), way=3, dtype=F64):
    rng = np.random.default_rng(seed)

    def part():
        x = rng.normal(size=(tasks, n) + tuple(shape)).astype(dtype)
        y = np.stack([rng.permutation(np.arange(n) % way) for _ in range(tasks)]).astype("int32")
        return tf.constant(x), tf.constant(y)
    return maml_tf.Episode(*part(), *part())


def conv_bn_relu_maxpool(dtype=F64, shape=(8, 8, 2), way=3):
    """The issue's Functional model: Conv2D, BatchNormalization, ReLU, MaxPooling2D, Dense."""
    inputs = keras.Input(shape, dtype=dtype)
    x = inputs
    for i in range(2):
        x = L.Conv2D(4, 3, padding="same", dtype=dtype, name=f"conv{i}")(x)
        x = L.BatchNormalization(dtype=dtype, name=f"bn{i}")(x)
        x = L.ReLU(dtype=dtype)(x)
        x = L.MaxPooling2D(dtype=dtype)(x)
    x = L.Flatten(dtype=dtype)(x)
    return keras.Model(inputs, L.Dense(way, dtype=dtype, name="head")(x))


def many_layers(dtype=F64, shape=(8, 8, 2), way=3, dropout=0.3):
    """Most supported layers, with smooth activations (so finite differences are clean)."""
    inputs = keras.Input(shape, dtype=dtype)
    x = L.ZeroPadding2D(1, dtype=dtype)(inputs)
    x = L.Conv2D(4, 3, strides=2, padding="valid", activation="tanh", dtype=dtype)(x)
    a = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", dtype=dtype)(x)
    a = L.LayerNormalization(dtype=dtype)(a)
    a = L.ELU(dtype=dtype)(a)
    b = L.Conv2D(8, 1, use_bias=False, dtype=dtype)(x)
    b = L.BatchNormalization(center=False, dtype=dtype)(b)
    x = L.Add(dtype=dtype)([a, b])
    x = L.Activation("softplus", dtype=dtype)(x) * 0.5 + x
    x = L.AveragePooling2D(3, strides=2, padding="same", dtype=dtype)(x)
    x = L.Concatenate(dtype=dtype)([x, L.Cropping2D(((0, 0), (0, 0)), dtype=dtype)(x)])
    p = L.GlobalAveragePooling2D(dtype=dtype)(x)
    q = L.Reshape((-1,), dtype=dtype)(L.GlobalMaxPooling2D(keepdims=True, dtype=dtype)(x))
    x = L.Concatenate(dtype=dtype)([p, q])
    x = L.Dense(6, activation="gelu", dtype=dtype)(x)
    x = L.Dropout(dropout, dtype=dtype)(x)
    return keras.Model(inputs, L.Dense(way, dtype=dtype, name="head")(x))


class SubclassedNet(keras.Model):
    """A subclassed model: layers and keras.ops in call()."""

    def __init__(self, way=3, dtype=F64):
        super().__init__(dtype=dtype)
        self.conv = L.Conv2D(4, 3, padding="same", dtype=dtype)
        self.bn = L.BatchNormalization(dtype=dtype)
        self.pool = L.MaxPooling2D(dtype=dtype)
        self.flat = L.Flatten(dtype=dtype)
        self.head = L.Dense(way, dtype=dtype)

    def call(self, x, training=None):
        h = self.pool(keras.ops.tanh(self.bn(self.conv(x), training=training)))
        return self.head(self.flat(h) * 2.0)


def _subclassed(dtype=F64):
    model = SubclassedNet(dtype=dtype)
    model(np.zeros((1, 8, 8, 2), dtype))
    return model


class Block(keras.Model):
    """A subclassed block, used as a layer inside a Functional model."""

    def __init__(self, dtype=F64):
        super().__init__(dtype=dtype)
        self.conv = L.Conv2D(3, 3, padding="same", dtype=dtype)
        self.bn = L.BatchNormalization(dtype=dtype)

    def call(self, x):
        return keras.ops.tanh(self.bn(self.conv(x)))


def nested(dtype=F64):
    inputs = keras.Input((8, 8, 2), dtype=dtype)
    inner = keras.Sequential([L.Conv2D(2, 1, dtype=dtype)], name="inner")
    x = Block(dtype)(inner(inputs))
    return keras.Model(inputs, L.Dense(3, dtype=dtype)(L.Flatten(dtype=dtype)(x)))


def _fd_error(learner, episode, directions=6, eps=1e-5, seed=0):
    """Max relative error of the public meta_gradient against central finite differences
    of the meta-loss along random unit directions (float64)."""
    weights = [tf.constant(w) for w in learner.meta_weights()]
    _, grads = learner.meta_gradient(episode, weights=weights)
    rng = np.random.default_rng(seed)
    worst = 0.0
    for _ in range(directions):
        v = [rng.normal(size=w.shape) for w in weights]
        norm = np.sqrt(sum((d ** 2).sum() for d in v))
        v = [d / norm for d in v]
        plus, _ = learner.meta_gradient(episode, weights=[w + eps * d for w, d in zip(weights, v)])
        minus, _ = learner.meta_gradient(episode, weights=[w - eps * d for w, d in zip(weights, v)])
        numeric = (float(plus) - float(minus)) / (2 * eps)
        analytic = sum(float(tf.reduce_sum(g * d)) for g, d in zip(grads, v))
        worst = max(worst, abs(analytic - numeric) / max(abs(numeric), 1e-8))
    return worst


def _global_rel(a, b):
    num = np.sqrt(sum(float(tf.reduce_sum((tf.cast(x, tf.float64) - tf.cast(y, tf.float64)) ** 2))
                      for x, y in zip(a, b)))
    return num / np.sqrt(sum(float(tf.reduce_sum(tf.cast(x, tf.float64) ** 2)) for x in a))


class ExactnessTest(tf.test.TestCase, parameterized.TestCase):

    def tearDown(self):
        keras.backend.clear_session()   # keeps the pytest process small
        super().tearDown()

    def test_normalize_over_merged_axes_equals_the_unmerged_form_to_second_order(self):
        """Batch norm reduces over its (N, H, W) axes merged into one (models/layers.py,
        ``_merge_axes``): the output, collected statistics and first and second derivatives
        must equal the computation over the separate axes."""
        from maml_tf.models import layers
        rng = np.random.default_rng(7)
        x = tf.constant(rng.normal(size=[2, 3, 4, 5, 3]))
        gamma = tf.constant(rng.normal(size=[2, 1, 1, 1, 3]))
        beta = tf.constant(rng.normal(size=[1, 1, 1, 1, 3]))
        r = tf.constant(rng.normal(size=x.shape))

        def derivatives():
            collect = layers.PerTaskStats()
            with tf.GradientTape() as t2:
                t2.watch([x, gamma])
                with tf.GradientTape() as t1:
                    t1.watch([x, gamma, beta])
                    out = layers.normalize(x, [1, 2, 3], gamma, beta, 1e-3, collect=collect)
                    loss = tf.reduce_sum(tf.tanh(out) * r)
                gx, gg, gb = t1.gradient(loss, [x, gamma, beta])
                second = tf.reduce_sum(gx ** 2) + tf.reduce_sum(tf.sin(gg)) + tf.reduce_sum(gb)
            return [out, *collect[0], gx, gg, gb, *t2.gradient(second, [x, gamma])]

        merged = derivatives()
        self.assertIsNotNone(layers._merge_axes(x, [1, 2, 3], (gamma, beta)))
        original = layers._merge_axes
        layers._merge_axes = lambda *a: None
        try:
            separate = derivatives()
        finally:
            layers._merge_axes = original
        for a, b in zip(merged, separate):
            self.assertEqual(a.shape, b.shape)
            self.assertAllClose(a, b, rtol=1e-12, atol=1e-12)
        # Parameters that vary along a reduced axis (layer norm's scale) keep the separate form.
        self.assertIsNone(layers._merge_axes(x, [2, 3, 4], (tf.ones([1, 1, 1, 1, 3]), None)))
        # Negative axes name the same merge.
        self.assertEqual(layers._merge_axes(x, [-4, -3, -2], (gamma, beta))[0].shape, [2, 60, 3])

    @parameterized.named_parameters(("functional", conv_bn_relu_maxpool),
                                    ("subclassed", _subclassed),
                                    ("nested", nested),
                                    # Dropout draws new masks at every call: off for FD.
                                    ("many_layers", lambda: many_layers(dropout=0.0)))
    def test_meta_gradient_matches_float64_finite_differences(self, build):
        keras.utils.set_random_seed(1)
        learner = maml_tf.MAML(build(), inner_lr=0.4, inner_steps=2)
        self.assertTrue(learner.net.batched)
        self.assertLess(_fd_error(learner, _episode(2)), 1e-6)

    def test_resnet12_meta_gradient_matches_finite_differences(self):
        keras.utils.set_random_seed(2)
        model = resnet.resnet12((16, 16, 3), 3, filters=(3, 4, 4, 5), dtype=F64)
        learner = maml_tf.MAML(model, inner_lr=0.3)
        self.assertLess(_fd_error(learner, _episode(3, shape=(16, 16, 3)), directions=3), 1e-6)

    def test_native_convolution_equals_im2col_to_the_third_derivative(self):
        """Stride-1 convolutions run natively with a custom gradient (models/layers.py); it
        must equal the im2col form at every order, for shared and per-task kernels, 'same'
        (odd and even kernels) and 'valid' padding."""
        from maml_tf.models import layers
        rng = np.random.default_rng(5)

        def derivatives(x, k, padding, r):
            with tf.GradientTape() as t3:
                t3.watch(k)
                with tf.GradientTape() as t2:
                    t2.watch([x, k])
                    with tf.GradientTape() as t1:
                        t1.watch([x, k])
                        loss = tf.reduce_sum(tf.tanh(layers.conv2d(x, k, padding=padding)) * r)
                    gx, gk = t1.gradient(loss, [x, k])
                    second = tf.reduce_sum(gx ** 3) + tf.reduce_sum(tf.sin(gk))
                hx, hk = t2.gradient(second, [x, k])
                third = tf.reduce_sum(hx * hx) + tf.reduce_sum(hk ** 2)
            return [loss, gx, gk, hx, hk, t3.gradient(third, k)]

        for kernels, size, padding in [(3, 3, "same"), (1, 3, "same"), (2, 2, "same"),
                                       (2, 3, "valid"), (1, 4, "valid")]:
            tasks = max(kernels, 2)
            x = tf.constant(rng.normal(size=[tasks, 2, 7, 6, 3]))
            k = tf.constant(rng.normal(size=[kernels, size, size, 3, 4]) * 0.3)
            calls = []
            native = layers._native_conv2d
            layers._native_conv2d = lambda *a: calls.append(1) or native(*a)
            try:
                r = tf.constant(rng.normal(size=layers.conv2d(x, k, padding=padding).shape))
                fast = derivatives(x, k, padding, r)
                self.assertTrue(calls, "the native path was not taken")
                layers.NATIVE_CONV_MAX_KERNELS, limit = 0, layers.NATIVE_CONV_MAX_KERNELS
                calls.clear()
                try:
                    reference = derivatives(x, k, padding, r)
                finally:
                    layers.NATIVE_CONV_MAX_KERNELS = limit
                self.assertFalse(calls)
            finally:
                layers._native_conv2d = native
            for a, b in zip(fast, reference):
                self.assertAllClose(a, b, rtol=1e-12, atol=1e-12 * float(tf.reduce_max(tf.abs(b))))

    @parameterized.named_parameters(("functional", conv_bn_relu_maxpool),
                                    ("subclassed", _subclassed),
                                    ("many_layers", lambda dtype: many_layers(dtype, dropout=0.0)))
    def test_float32_xla_agrees_with_float64(self, build):
        """Also guards the max-pool trap: XLA's MaxPool second derivative is wrong in float32."""
        keras.utils.set_random_seed(3)
        m64 = build(F64)
        m32 = build("float32")
        for v32, v64 in zip(m32.weights, m64.weights):
            v32.assign(tf.cast(v64.value, tf.float32))
        l64 = maml_tf.MAML(m64, inner_lr=0.4)
        l32 = maml_tf.MAML(m32, inner_lr=0.4)
        ep64 = _episode(4)
        ep32 = maml_tf.Episode(*(tf.cast(t, tf.float32) if t.dtype == tf.float64 else t
                                 for t in ep64[:4]))
        g64 = l64.meta_gradient(ep64)[1]
        g32 = tf.function(lambda ep: l32.meta_gradient(ep)[1], jit_compile=True)(ep32)
        self.assertLess(_global_rel(g64, g32), 1e-5)

    def test_each_task_matches_the_keras_model_at_its_own_weights(self):
        """The batched walk equals the Keras model's own call, task by task, with different
        weights per task (training: batch statistics; inference: dropout off)."""
        keras.utils.set_random_seed(4)
        model = many_layers()
        net = FunctionalModel(model)
        rng = np.random.default_rng(5)
        params = [tf.stack([w + 0.1 * rng.normal(size=w.shape) for _ in range(3)])
                  for w in net.meta_weights()]
        x = tf.constant(rng.normal(size=(3, 5, 8, 8, 2)))
        non_trainable = [v.value for v in model.non_trainable_variables]
        with inference():
            batched = net.apply(params, x)
        for t in range(3):
            # Keras' training=True is batch statistics and dropout: remove the dropout to compare.
            model.layers[-2].rate = 0.0
            ref, _ = model.stateless_call([p[t] for p in params], non_trainable, x[t], training=True)
            model.layers[-2].rate = 0.3
            self.assertAllClose(batched[t], ref, rtol=1e-10, atol=1e-12)

    def test_dropout_is_on_in_training_and_off_in_evaluation(self):
        inputs = keras.Input((50,), dtype=F64)
        model = keras.Model(inputs, L.Dropout(0.5, dtype=F64)(L.Dense(200, dtype=F64)(inputs)))
        net = FunctionalModel(model)
        params = [tf.stack([w, w]) for w in net.meta_weights()]
        x = tf.ones([2, 4, 50], F64)
        trained = net.apply(params, x).numpy()
        with inference():
            evaluated = net.apply(params, x).numpy()
        zeros = np.mean(trained == 0)
        self.assertBetween(zeros, 0.4, 0.6)
        kept = trained != 0
        self.assertAllClose(trained[kept], 2.0 * evaluated[kept])
        self.assertEqual(np.mean(evaluated == 0), 0.0)

    def test_frozen_batch_norm_uses_its_moving_statistics(self):
        model = conv_bn_relu_maxpool()
        model.get_layer("bn0").trainable = False
        model.get_layer("bn0").moving_mean.assign(tf.fill([4], tf.constant(0.3, F64)))
        net = FunctionalModel(model)
        self.assertNotIn("bn0/gamma", net.names)
        params = [tf.expand_dims(w, 0) for w in net.meta_weights()]
        x = tf.constant(np.random.default_rng(6).normal(size=(1, 4, 8, 8, 2)))
        non_trainable = [v.value for v in model.non_trainable_variables]
        ref, _ = model.stateless_call(net.meta_weights(), non_trainable, x[0], training=True)
        self.assertAllClose(net.apply(params, x)[0], ref, rtol=1e-10)


class Scale(L.Layer):
    """A custom layer: maml_tf cannot know its second derivative."""

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1],), initializer="ones", name="w")

    def call(self, x):
        return x * self.w


class ScaleBatched(maml_tf.models.layers.TaskBatchedLayer):
    """The same layer, written for a task axis: accepted."""

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1],), initializer="ones", name="w")

    def batched_apply(self, params, x, training=True):
        return x * params[0][:, None, :]


def _with(layer):
    inputs = keras.Input((5,))
    return keras.Model(inputs, L.Dense(3)(layer(L.Dense(4)(inputs))))


class RefusalTest(tf.test.TestCase):

    def tearDown(self):
        keras.backend.clear_session()
        super().tearDown()

    def test_an_unknown_layer_is_refused_by_second_order_learners(self):
        with self.assertRaisesRegex(InexactModelError, r"layer 'scale' \(Scale\).*allow_inexact=True"):
            maml_tf.MAML(_with(Scale(name="scale")))
        with self.assertRaisesRegex(InexactModelError, r"groups=2"):
            inputs = keras.Input((6, 6, 4))
            maml_tf.MetaSGD(keras.Model(inputs, L.Conv2D(4, 3, groups=2)(inputs)))

    def test_opt_in_warns_and_first_order_accepts(self):
        model = _with(Scale(name="scale"))
        with self.assertWarnsRegex(UserWarning, "layer 'scale'"):
            learner = maml_tf.MAML(model, allow_inexact=True)
        self.assertTrue(learner.net.batched)   # the other layers still run batched
        with warnings.catch_warnings(record=True):
            fo = maml_tf.FOMAML(model)
            maml_tf.Reptile(model)
        ep = maml_tf.Episode(tf.random.normal([2, 6, 5]), tf.zeros([2, 6], tf.int32),
                             tf.random.normal([2, 6, 5]), tf.zeros([2, 6], tf.int32))
        _, grads = fo.meta_gradient(ep)
        self.assertLen(grads, len(fo.meta_variables))
        self.assertTrue(all(np.all(np.isfinite(g.numpy())) for g in grads))

    def test_a_task_batched_custom_layer_is_accepted(self):
        learner = maml_tf.MAML(_with(ScaleBatched()))
        self.assertEqual(learner.net.problems, [])

    def test_variables_used_outside_layers_are_refused(self):
        class Raw(keras.Model):
            def build(self, shape):
                self.w = self.add_weight(shape=(shape[-1], 3), name="raw")

            def call(self, x):
                return keras.ops.matmul(x, self.w)
        model = Raw()
        model(np.zeros((1, 5), "float32"))
        with self.assertRaisesRegex(InexactModelError, "variables used outside any layer"):
            maml_tf.MAML(model)

    def test_an_unbuilt_model_gets_a_clear_error(self):
        with self.assertRaisesRegex(ValueError, "Build the model"):
            maml_tf.MAML(keras.Sequential([L.Dense(3)]))


class PublicApiTest(tf.test.TestCase):

    def tearDown(self):
        keras.backend.clear_session()
        super().tearDown()

    def test_adapt_predict_and_meta_gradient(self):
        keras.utils.set_random_seed(5)
        model = conv_bn_relu_maxpool("float32")
        learner = maml_tf.MAML(model, inner_lr=0.4, inner_steps=3)
        ep = _episode(7, dtype="float32")
        fast = learner.adapt(ep.support_x, ep.support_y)
        self.assertEqual([tuple(f.shape) for f in fast],
                         [(2,) + tuple(v.shape) for v in learner.meta_variables])
        before = learner.loss_fn(learner.predict(learner.adapt(ep.support_x, ep.support_y, steps=0),
                                                 ep.support_x), ep.support_y)
        after = learner.loss_fn(learner.predict(fast, ep.support_x), ep.support_y)
        self.assertTrue(np.all(after.numpy() < before.numpy()))
        # A small step along the meta-gradient lowers the meta-loss.
        ep = ep._replace(query_x=ep.support_x, query_y=ep.support_y)
        loss, grads = learner.meta_gradient(ep)
        self.assertEqual(len(grads), len(learner.meta_variables))
        keras.optimizers.SGD(1e-3).apply(grads, learner.meta_variables)
        self.assertLess(float(learner.meta_gradient(ep)[0]), float(loss))
        self.assertEqual(learner.evaluate(ep).accuracy.shape, (2, 4))

    def test_losses_given_as_name_keras_object_or_callable_agree(self):
        keras.utils.set_random_seed(6)
        model = conv_bn_relu_maxpool()
        ep = _episode(8)
        results = []
        for loss in ("cross_entropy",
                     keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                     lambda y, p: keras.losses.sparse_categorical_crossentropy(y, p, from_logits=True),
                     lambda y, p: tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                         y, p, from_logits=True))):   # a scalar per call: called task by task
            results.append(maml_tf.MAML(model, inner_lr=0.4, loss=loss).meta_gradient(ep))
        for loss, grads in results[1:]:
            self.assertAllClose(loss, results[0][0], rtol=1e-12)
            for a, b in zip(grads, results[0][1]):
                self.assertAllClose(a, b, rtol=1e-10, atol=1e-14)

    def test_regression_with_a_keras_loss_name(self):
        inputs = keras.Input((1,), dtype=F64)
        model = keras.Model(inputs, L.Dense(1, dtype=F64)(L.Dense(8, activation="tanh", dtype=F64)(inputs)))
        ep = maml_tf.Episode(*[tf.constant(np.random.default_rng(i).normal(size=(3, 5, 1)))
                               for i in range(4)])
        a = maml_tf.MAML(model, loss="mse").meta_gradient(ep)
        b = maml_tf.MAML(model, loss="mean_squared_error").meta_gradient(ep)
        self.assertAllClose(a[0], b[0], rtol=1e-12)
        self.assertIsNone(maml_tf.MAML(model, loss="mse").evaluate(ep).accuracy)

    def test_every_algorithm_takes_a_user_model(self):
        ep = _episode(9, dtype="float32")
        for cls in (maml_tf.MAML, maml_tf.FOMAML, maml_tf.Reptile, maml_tf.MetaSGD, maml_tf.ANIL,
                    maml_tf.MAMLPlusPlus, maml_tf.ProtoNet):
            learner = cls(conv_bn_relu_maxpool("float32"), inner_lr=0.1)
            loss, grads = learner.meta_gradient(ep)
            self.assertLen(grads, len(learner.meta_variables), cls.__name__)
            self.assertTrue(np.isfinite(float(loss)), cls.__name__)

    def test_anil_adapts_only_the_head_of_a_functional_model(self):
        learner = maml_tf.ANIL(conv_bn_relu_maxpool("float32"), inner_lr=0.5, inner_steps=2)
        self.assertEqual([v.path for v in learner.head_learner.net.variables],
                         ["head/kernel", "head/bias"])
        ep = _episode(10, dtype="float32")
        fast = learner.adapt(ep.support_x, ep.support_y)
        for w, f in zip(learner.meta_weights()[:-2], fast[:-2]):
            self.assertAllEqual(tf.broadcast_to(w, f.shape), f)
        self.assertGreater(float(tf.reduce_max(tf.abs(fast[-2] - learner.meta_weights()[-2]))), 0)
        self.assertEqual(maml_tf.ProtoNet(conv_bn_relu_maxpool("float32")).way, 3)


# -- the command line and the README example (subprocesses) --------------------------------
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_NETS = '''
import keras

def mlp(input_shape, num_outputs):
    inputs = keras.Input(input_shape)
    h = keras.layers.Dense(16, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Dense(num_outputs)(h))

def not_a_model(input_shape, num_outputs):
    return "a string"
'''
FAST = ["--num_iterations=2", "--meta_batch_size=2", "--eval_tasks=4", "--val_tasks=2",
        "--eval_every=2", "--log_every=1", "--checkpoint_every=2"]


def _env():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "MAML_TF_OFFLINE": "1"}


def _python(args, cwd):
    return subprocess.run([sys.executable] + args, cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=600)


def test_cli_model_function_trains_evaluates_and_ignores_the_users_data_and_models(tmp_path):
    # A folder with its own data/ package and models.py, as users' projects often have:
    # maml_tf's own packages are maml_tf.data and maml_tf.models, so nothing clashes.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "__init__.py").write_text("WHO = 'user'\n")
    (tmp_path / "models.py").write_text("WHO = 'user'\n")
    (tmp_path / "user_nets.py").write_text(USER_NETS)
    workdir = tmp_path / "run"
    train = _python(["-m", "maml_tf.train", "--dataset=sinusoid", "--model=user_nets:mlp",
                     f"--workdir={workdir}"] + FAST, tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    assert json.loads((workdir / "config.json").read_text())["network"]["model"] == "user_nets:mlp"
    first = json.loads((workdir / "results.json").read_text())
    evaluate = _python(["-m", "maml_tf.evaluate", f"--workdir={workdir}"], tmp_path)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    again = json.loads(next(workdir.glob("results-step2-*.json")).read_text())
    assert again["test"] == first["test"]   # the same weights and tasks: the same numbers
    # The installed package squats no generic name.
    probe = _python(["-c", "import importlib.util as u, data, models, maml_tf.data, maml_tf.models;"
                     "print(data.WHO, models.WHO, u.find_spec('maml_tf.data').origin)"], tmp_path)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.split()[:2] == ["user", "user"]


@pytest.mark.parametrize("spec, message", [
    ("user_nets:missing", "has no attribute 'missing'"),
    ("no_such_module:fn", "the module 'no_such_module' could not be loaded"),
    ("user_nets:not_a_model", "returned a str, not a keras.Model"),
])
def test_cli_bad_model_function_is_one_clear_paragraph(tmp_path, spec, message):
    (tmp_path / "user_nets.py").write_text(USER_NETS)
    out = _python(["-m", "maml_tf.train", "--dataset=sinusoid", f"--model={spec}",
                   f"--workdir={tmp_path / 'run'}"] + FAST, tmp_path)
    assert out.returncode != 0
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert not (tmp_path / "run" / "config.json").exists()   # nothing written


def _readme_block(marker: str) -> str:
    readme = open(os.path.join(ROOT, "README.md")).read()
    match = re.search(r"```python\n(# " + re.escape(marker) + r"\n.*?)```", readme, re.S)
    assert match, f"README has no python block starting with '# {marker}'"
    return match.group(1)


def _substitute(code: str, replacements: dict) -> str:
    for old, new in replacements.items():
        assert old in code, f"the README example no longer contains {old!r}"
        code = code.replace(old, new)
    return code


def test_readme_example_trains_a_user_model_on_omniglot_then_evaluates(tmp_path, omniglot_dir):
    workdir = tmp_path / "my_conv4"
    code = _substitute(_readme_block("my_maml.py"), {
        '"/path/to/omniglot"': repr(omniglot_dir),
        '"runs/my_conv4"': repr(str(workdir)),
        # Without XLA (test_cli_model_function_trains_... compiles a user's model): this
        # checks the README's code, its workdir and the evaluation entry point.
        "num_iterations=60000": "num_iterations=2, eval_tasks=4, val_tasks=2, eval_every=2, "
                                "jit_compile=False, step_metrics_every=1",   # one program
        "meta_batch_size=32": "meta_batch_size=2",
    })
    script = tmp_path / "my_maml.py"
    script.write_text(code)
    run = _python([str(script)], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(json.loads(run.stdout.strip().splitlines()[-1])) == 4   # after 0..3 steps
    config = json.loads((workdir / "config.json").read_text())
    assert config["network"]["model"] == f"{script}:my_model"
    assert (workdir / "checkpoints" / "ckpt-2.index").exists() and list((workdir / "train").iterdir())
    evaluate = _python(["-m", "maml_tf.evaluate", f"--workdir={workdir}", "--eval_tasks=2"], ROOT)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]


def test_readme_library_loop_runs(tmp_path, omniglot_dir):
    code = _substitute(_readme_block("my_maml.py") + _readme_block("the same, step by step"), {
        '"/path/to/omniglot"': repr(omniglot_dir),
        "results = maml_tf.train(": "results = None and maml_tf.train(",   # not run here
        'print(results["test"]["1shot"]["accuracy"]["mean"])': "",
        ".take(1000)": ".take(3)",
        "meta_batch_size=32": "meta_batch_size=2",
    })
    code += "\nassert np.isfinite(float(loss))\n"
    script = tmp_path / "loop.py"
    script.write_text(code)
    run = _python([str(script)], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]


def test_loading_a_model_file_never_starts_the_run_in_it(tmp_path):
    """A script without a __main__ guard: rebuilding its model must not train again."""
    workdir = tmp_path / "would_train"
    (tmp_path / "script.py").write_text(USER_NETS + (
        "\nimport maml_tf\n"
        f"maml_tf.train(maml_tf.Config(num_iterations=1), workdir={str(workdir)!r}, model=mlp)\n"
        "raise AssertionError('unreachable: the load stops at the run')\n"))
    from maml_tf.models import load_model_fn, model_spec
    fn = load_model_fn(f"{tmp_path / 'script.py'}:mlp")
    assert fn((1,), 1).output_shape == (None, 1)
    assert not workdir.exists()
    assert model_spec(fn) == f"{tmp_path / 'script.py'}:mlp"


def softmax_model(input_shape, num_outputs):
    import keras
    return keras.Sequential([keras.Input(input_shape), keras.layers.Flatten(),
                             keras.layers.Dense(num_outputs, activation="softmax", name="probs")])


def test_a_model_that_ends_in_a_softmax_is_warned_about(tmp_path, caplog):
    from maml_tf import api
    from maml_tf.config import Config
    config = Config(dataset="omniglot", way=3, meta_batch_size=2, jit_compile=False)
    with caplog.at_level("WARNING"):
        api.build(config, str(tmp_path / "run"), model=softmax_model)
    assert "last layer 'probs' (Dense) outputs probabilities" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        api.build(config, str(tmp_path / "zoo"))
    assert "outputs probabilities" not in caplog.text


def test_an_unsupported_keras_op_is_named_as_an_operation_with_the_command_line_fix():
    import keras
    import maml_tf
    from maml_tf.models.functional import InexactModelError
    x = keras.Input((4,))
    model = keras.Model(x, keras.ops.cumsum(keras.layers.Dense(3)(x), axis=-1))
    with pytest.raises(InexactModelError) as e:
        maml_tf.MAML(model)
    assert "operation 'cumsum' (Cumsum)" in str(e.value) and "layer 'cumsum'" not in str(e.value)
    assert "--allow_inexact on the command line" in str(e.value)
