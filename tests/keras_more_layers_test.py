"""More of Keras on the exact, task-batched path: GroupNormalization, UnitNormalization, Conv1D,
SeparableConv2D, Conv2DTranspose, Embedding, the 1-D pools, SpatialDropout1D/2D, LSTM and GRU.
Each model's second-order meta-gradient is checked against float64 finite differences, and
its task-batched run against the Keras model's own call at each task's weights."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl.testing import parameterized

import maml_tf
from maml_tf.models.functional import FunctionalModel, InexactModelError, inference
from keras_model_test import _fd_error

L = keras.layers
F64 = "float64"


def sequence_conv_model():
    inputs = keras.Input((8, 3), dtype=F64)
    x = L.Conv1D(4, 3, strides=2, padding="same", dtype=F64)(inputs)
    x = L.GroupNormalization(groups=2, dtype=F64)(x)
    x = L.Activation("tanh", dtype=F64)(x)
    x = L.Conv1D(4, 2, padding="causal", dilation_rate=2, activation="tanh", dtype=F64)(x)
    x = L.MaxPooling1D(2, dtype=F64)(x)
    x = L.AveragePooling1D(2, strides=1, padding="same", dtype=F64)(x)
    x = L.SpatialDropout1D(0.0, dtype=F64)(x)
    x = L.Concatenate(dtype=F64)([L.GlobalAveragePooling1D(dtype=F64)(x),
                                  L.GlobalMaxPooling1D(dtype=F64)(x)])
    x = L.UnitNormalization(dtype=F64)(x)
    return keras.Model(inputs, L.Dense(3, dtype=F64)(x))


def image_model():
    inputs = keras.Input((3, 3, 2), dtype=F64)
    x = L.SeparableConv2D(4, 3, depth_multiplier=2, padding="same", dtype=F64)(inputs)
    x = L.GroupNormalization(groups=2, dtype=F64)(x)
    x = L.Activation("tanh", dtype=F64)(x)
    x = L.UnitNormalization(dtype=F64)(x)     # per pixel, over 4 channels of magnitude ~1
    x = L.Conv2DTranspose(3, 3, strides=2, padding="same", activation="tanh", dtype=F64)(x)
    x = L.Conv2DTranspose(2, 2, strides=3, padding="same", dtype=F64)(x)    # kernel < stride
    x = L.Conv2DTranspose(2, 3, strides=2, padding="valid", activation="tanh", dtype=F64)(x)
    x = L.SpatialDropout2D(0.0, dtype=F64)(x)
    x = L.GlobalAveragePooling2D(dtype=F64)(x)
    return keras.Model(inputs, L.Dense(3, dtype=F64)(x))


def recurrent_model():
    inputs = keras.Input((5,), dtype="int32")
    x = L.Embedding(7, 4, dtype=F64)(inputs)
    x = L.LSTM(3, return_sequences=True, dtype=F64)(x)
    x = L.GRU(3, return_sequences=True, go_backwards=True, dtype=F64)(x)
    x = L.GRU(2, reset_after=False, dtype=F64)(x)
    return keras.Model(inputs, L.Dense(3, dtype=F64)(x))


MODELS = {"sequence_conv": (sequence_conv_model, (8, 3)), "image": (image_model, (3, 3, 2)),
          "recurrent": (recurrent_model, (5,))}


def _inputs(rng, shape, size):
    if shape == (5,):   # token ids
        return rng.integers(0, 7, size=size + shape).astype("int32")
    return rng.normal(size=size + shape)


def _episode(name, seed, tasks=2, n=6, way=3):
    rng = np.random.default_rng(seed)
    shape = MODELS[name][1]

    def part():
        y = np.stack([rng.permutation(np.arange(n) % way) for _ in range(tasks)]).astype("int32")
        return tf.constant(_inputs(rng, shape, (tasks, n))), tf.constant(y)
    return maml_tf.Episode(*part(), *part())


class MoreLayersTest(tf.test.TestCase, parameterized.TestCase):

    def tearDown(self):
        keras.backend.clear_session()
        super().tearDown()

    @parameterized.named_parameters(*[(name, name) for name in MODELS])
    def test_meta_gradient_matches_float64_finite_differences(self, name):
        keras.utils.set_random_seed(7)
        learner = maml_tf.MAML(MODELS[name][0](), inner_lr=0.3, inner_steps=2)
        self.assertTrue(learner.net.batched)
        self.assertLess(_fd_error(learner, _episode(name, 8), directions=4), 1e-6)

    @parameterized.named_parameters(*[(name, name) for name in MODELS])
    def test_each_task_matches_the_keras_model_at_its_own_weights(self, name):
        keras.utils.set_random_seed(9)
        build, shape = MODELS[name]
        model = build()
        net = FunctionalModel(model)
        rng = np.random.default_rng(10)
        params = [tf.stack([w + 0.2 * rng.normal(size=w.shape) for _ in range(3)])
                  for w in net.meta_weights()]
        x = tf.constant(_inputs(rng, shape, (3, 5)))
        non_trainable = [v.value for v in model.non_trainable_variables]
        with inference():
            batched = net.apply(params, x)
        for t in range(3):
            ref, _ = model.stateless_call([p[t] for p in params], non_trainable, x[t],
                                          training=True)
            self.assertAllClose(batched[t], ref, rtol=1e-9, atol=1e-11)

    def test_spatial_dropout_drops_whole_channels_in_training_only(self):
        for layer, shape in ((L.SpatialDropout1D(0.5), (6, 4)), (L.SpatialDropout2D(0.5), (3, 3, 4))):
            inputs = keras.Input(shape)
            # An identity Dense, so that the network has a weight to meta-learn.
            out = L.Dense(4, kernel_initializer="identity")(layer(inputs))
            net = FunctionalModel(keras.Model(inputs, out))
            params = [tf.stack([w, w]) for w in net.meta_weights()]   # two tasks
            x = tf.ones([2, 8] + list(shape))
            dropped = tf.reshape(net.apply(params, x), [2, 8, -1, 4]).numpy()
            # An example's channel is kept (x 2) or dropped (0) at every position.
            self.assertTrue(np.all(dropped.min(axis=2) == dropped.max(axis=2)))
            self.assertEqual({0.0, 2.0}, set(np.unique(dropped)))
            with inference():
                self.assertAllEqual(net.apply(params, x), x)

    def test_configurations_that_change_the_math_are_refused_by_name(self):
        for layer, why in [(L.LSTM(3, return_state=True), "return_state"),
                           (L.GRU(3, dropout=0.1), "dropout"),
                           (L.Conv2DTranspose(2, 3, output_padding=1, strides=2), "output_padding")]:
            inputs = keras.Input((4, 4, 2) if isinstance(layer, L.Conv2DTranspose) else (4, 2))
            out = layer(inputs)
            model = keras.Model(inputs, out[0] if isinstance(out, list) else out)
            with pytest.raises(InexactModelError, match=why):
                maml_tf.MAML(model)
        inputs = keras.Input((4,), dtype="int32")
        with pytest.raises(InexactModelError, match="mask_zero"):
            maml_tf.MAML(keras.Model(inputs, L.Embedding(5, 2, mask_zero=True)(inputs)))
