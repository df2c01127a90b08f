"""The Conditional Neural Process: its own checks, and the learner contract's promises on
sinusoid tasks (the contract's classification tests do not apply to a regression-only
learner): the loss falls, save/restore round-trips, one column of metrics."""

import math

import numpy as np
import pytest
import tensorflow as tf
import keras

from algorithms_test import _fd_check, _sinusoid_episode
from maml_tf import data as data_lib
from maml_tf.algorithms import build_learner
from maml_tf.config import Config, ConfigError
from maml_tf.data.episode import Episode
from maml_tf.models import get_model
from maml_tf.train_loop import make_optimizer


def _cnp(dtype="float32", **kw):
    keras.utils.set_random_seed(0)
    config = Config.from_dict({"dataset": "sinusoid", "algorithm": "cnp", "shot": 5,
                               "meta_batch_size": 8, "meta_lr": 1e-3, **kw})
    return config, build_learner(config, get_model(config, dtype=dtype))


class CnpTest(tf.test.TestCase):

    def test_predictions_do_not_depend_on_the_order_of_the_context_points(self):
        _, learner = _cnp("float64")
        ep = _sinusoid_episode()
        w = learner.meta_weights()
        mu, sigma = learner.predict_distribution(w, ep.support_x, ep.support_y, ep.query_x)
        order = np.random.default_rng(0).permutation(ep.support_x.shape[1])
        mu2, sigma2 = learner.predict_distribution(w, tf.gather(ep.support_x, order, axis=1),
                                                   tf.gather(ep.support_y, order, axis=1),
                                                   ep.query_x)
        self.assertAllClose(mu, mu2, rtol=1e-12)
        self.assertAllClose(sigma, sigma2, rtol=1e-12)
        # ... while the context's content matters.
        mu3, _ = learner.predict_distribution(w, ep.support_x, ep.support_y + 1.0, ep.query_x)
        self.assertGreater(float(tf.reduce_max(tf.abs(mu3 - mu))), 0)

    def test_loss_is_the_gaussian_negative_log_likelihood_and_metrics_the_mse(self):
        _, learner = _cnp("float64")
        ep = _sinusoid_episode(1)
        w = learner.meta_weights()
        mu, sigma = (v.numpy() for v in learner.predict_distribution(
            w, ep.support_x, ep.support_y, ep.query_x))
        y = ep.query_y.numpy()
        nll = np.mean(0.5 * math.log(2 * math.pi) + np.log(sigma)
                      + 0.5 * ((y - mu) / sigma) ** 2, axis=(1, 2))
        loss, per_step = learner.meta_loss(w, ep, 0)
        self.assertAllClose(float(loss), nll.mean(), rtol=1e-12)
        self.assertAllClose(per_step.loss[:, 0], np.mean((y - mu) ** 2, axis=(1, 2)), rtol=1e-12)
        self.assertIsNone(per_step.accuracy)
        self.assertAllClose(learner.log_likelihood(w, ep), -nll, rtol=1e-12)
        self.assertTrue(np.all(sigma >= 0.1))

    def test_meta_gradient_matches_finite_differences(self):
        _, learner = _cnp("float64")
        n = len(learner.net.variables)
        _fd_check(self, learner, _sinusoid_episode(2), 0, index=0)     # decoder
        _fd_check(self, learner, _sinusoid_episode(2), 0, index=n)     # encoder

    def test_meta_training_lowers_the_loss_and_the_checkpoint_round_trips(self):
        config, learner = _cnp()
        optimizer = make_optimizer(config)
        episodes = iter(data_lib.train_dataset(config))
        variables = learner.meta_variables

        @tf.function
        def step(ep):
            loss, grads, per_step = learner.meta_step(learner.meta_weights(), ep, 0)
            optimizer.apply(grads[:len(variables)], variables)
            return loss, per_step.loss

        losses = [float(step(Episode(*next(episodes)[:4]))[0]) for _ in range(300)]
        self.assertLess(np.mean(losses[-30:]), np.mean(losses[:30]) - 0.2)
        _, per_step = step(Episode(*next(episodes)[:4]))
        self.assertEqual(per_step.shape, (config.meta_batch_size, 1))

        # As the training loop saves it: the model (the decoder) and the learner (the encoder).
        path = tf.train.Checkpoint(model=learner.net.model, learner=learner).save(
            self.get_temp_dir() + "/ckpt")
        _, other = _cnp()
        tf.train.Checkpoint(model=other.net.model, learner=other).restore(path).assert_consumed()
        for a, b in zip(learner.meta_weights(), other.meta_weights()):
            self.assertAllEqual(a, b)

    def test_is_refused_on_images_with_a_clear_message(self):
        with pytest.raises(ConfigError, match="regression"):
            Config.from_dict({"dataset": "omniglot", "algorithm": "cnp"})


def _snail(dtype="float32", **kw):
    from algorithms_test import _config
    config = _config("snail", **kw)
    return build_learner(config, get_model(config, dtype=dtype))


class SnailTest(tf.test.TestCase):

    def test_attention_and_convolutions_are_causal(self):
        # A position's output does not change when any later position changes.
        learner = _snail("float64")
        rng = np.random.default_rng(0)
        length = learner.support_size + 1
        x = rng.normal(size=(3, length, learner.embedding_dim + learner.way))
        out = learner.sequence(tf.constant(x), learner.extra).numpy()
        for i in range(length - 1):
            changed = x.copy()
            changed[:, i + 1:] = rng.normal(size=changed[:, i + 1:].shape)
            again = learner.sequence(tf.constant(changed), learner.extra).numpy()
            self.assertAllClose(again[:, :i + 1], out[:, :i + 1], rtol=1e-12, atol=1e-12)
            self.assertGreater(np.abs(again[:, i + 1:] - out[:, i + 1:]).max(), 0)

    def test_a_query_is_labelled_from_the_support_set_and_itself_only(self):
        # Each query has its own sequence: changing the other queries changes nothing (with
        # a per-example body: batch norm would mix the queries' statistics, transductively).
        learner = _snail("float64", norm="layer")
        ep = _episode_from(learner, 0)
        logits = learner.logits(learner.meta_weights(), ep).numpy()
        other = ep._replace(query_x=tf.concat([ep.query_x[:, :1], ep.query_x[:, 1:] + 0.5], 1))
        again = learner.logits(learner.meta_weights(), other).numpy()
        self.assertAllClose(again[:, 0], logits[:, 0], rtol=1e-12)
        # ... but the support labels matter.
        swapped = ep._replace(support_y=(ep.support_y + 1) % learner.way)
        moved = learner.logits(learner.meta_weights(), swapped).numpy()
        self.assertGreater(np.abs(moved - logits).max(), 1e-6)

    def test_meta_gradient_matches_finite_differences(self):
        learner = _snail("float64")
        n = len(learner.net.variables)
        _fd_check(self, learner, _episode_from(learner, 1), 0, index=0)        # the body
        _fd_check(self, learner, _episode_from(learner, 1), 0, index=n)        # attention
        _fd_check(self, learner, _episode_from(learner, 1), 0, index=n + 3)    # TC filter

    def test_other_shot_counts_are_refused(self):
        with pytest.raises(ConfigError, match="built for --shot"):
            Config.from_dict({"dataset": "omniglot", "algorithm": "snail", "shot": 1,
                              "eval_shots": (1, 5)})


def _episode_from(learner, seed):
    from algorithms_test import _episode
    return _episode(seed, dtype=learner.dtype.name)
