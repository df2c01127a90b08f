"""The learner test contract: every meta-learning algorithm inherits ``LearnerContract``
and passes it (accuracy at init ~ 1/way, the meta-loss falls, one episode can be
overfitted, save/restore round-trips, per-step metrics are reported).

A new algorithm adds a subclass that sets ``ALGORITHM`` (and its own specific checks).
"""

import numpy as np
import tensorflow as tf
import keras

from data.episode import Episode
from maml_tf.config import Config
from maml_tf.learners import build_learner, train_inner_steps
from models import get_model

WAY, SHOT, QUERY, TASKS = 5, 2, 3, 4


def _separable_episode(seed: int) -> Episode:
    """Tasks whose classes are distinct random prototypes plus noise: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    protos = rng.uniform(size=(TASKS, WAY, 28, 28, 1)).astype("float32")

    def part(n):
        y = np.tile(np.arange(WAY), n)
        x = protos[:, y] + 0.1 * rng.normal(size=(TASKS, WAY * n, 28, 28, 1)).astype("float32")
        return tf.constant(x), tf.constant(np.broadcast_to(y, (TASKS, WAY * n)).astype("int32"))
    return Episode(*part(SHOT), *part(QUERY))


class LearnerContract:
    """Mixed into a ``tf.test.TestCase`` by each algorithm's test class."""
    ALGORITHM: str

    def setUp(self):
        super().setUp()
        keras.utils.set_random_seed(0)
        self.config = Config.from_dict({"dataset": "omniglot", "algorithm": self.ALGORITHM,
                                        "way": WAY, "shot": SHOT, "query": QUERY,
                                        "num_filters": 16, "inner_lr": 0.4,
                                        "meta_batch_size": TASKS, "meta_lr": 3e-3})
        self.model = get_model(self.config)
        self.learner = build_learner(self.config, self.model)
        self.optimizer = keras.optimizers.Adam(self.config.meta_lr)
        self.steps = train_inner_steps(self.config)

    def _train(self, episode, iterations):
        variables = self.learner.net.variables

        @tf.function
        def step(ep):
            with tf.GradientTape() as tape:
                loss, per_step = self.learner.meta_loss(self.learner.net.meta_weights(), ep, self.steps)
            self.optimizer.apply(tape.gradient(loss, self.learner.net.meta_weights()), variables)
            return loss, per_step.loss, per_step.accuracy
        return [step(episode) for _ in range(iterations)]

    def test_accuracy_at_initialisation_is_about_one_over_way(self):
        accs = []
        for seed in range(5):
            _, per_step = self.learner.meta_loss(self.learner.net.meta_weights(),
                                                 _separable_episode(seed), 0)
            accs.append(float(tf.reduce_mean(per_step.accuracy)))
        self.assertAllClose(np.mean(accs), 1.0 / WAY, atol=0.12)

    def test_meta_loss_falls(self):
        history = self._train(_separable_episode(1), 15)
        first, last = float(history[0][0]), float(np.mean([h[0] for h in history[-3:]]))
        self.assertLess(last, 0.8 * first)

    def test_overfits_one_episode(self):
        episode = _separable_episode(2)
        history = self._train(episode, 60)
        final_acc = float(tf.reduce_mean(history[-1][2][:, -1]))
        self.assertGreater(final_acc, 0.95)

    def test_reports_metrics_for_every_inner_step(self):
        _, per_step = self.learner.meta_loss(self.learner.net.meta_weights(),
                                             _separable_episode(3), 3)
        self.assertEqual(per_step.loss.shape, (TASKS, 4))
        self.assertEqual(per_step.accuracy.shape, (TASKS, 4))

    def test_save_restore_round_trip(self):
        self._train(_separable_episode(4), 2)
        path = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer).save(
            self.get_temp_dir() + "/ckpt")
        saved = [v.numpy() for v in self.learner.net.variables]
        keras.utils.set_random_seed(1)
        model = get_model(self.config)
        learner = build_learner(self.config, model)
        optimizer = keras.optimizers.Adam(self.config.meta_lr)
        optimizer.build(learner.net.variables)
        tf.train.Checkpoint(model=model, optimizer=optimizer).restore(path).assert_consumed()
        for a, b in zip(saved, learner.net.variables):
            self.assertAllEqual(a, b.numpy())
        ep = _separable_episode(5)
        a, _ = self.learner.meta_loss(self.learner.net.meta_weights(), ep, 1)
        b, _ = learner.meta_loss(learner.net.meta_weights(), ep, 1)
        self.assertEqual(float(a), float(b))


class MamlContractTest(LearnerContract, tf.test.TestCase):
    ALGORITHM = "maml"


class FomamlContractTest(LearnerContract, tf.test.TestCase):
    ALGORITHM = "fomaml"

    def test_is_first_order(self):
        self.assertTrue(self.learner.first_order)


class PretrainContractTest(LearnerContract, tf.test.TestCase):
    ALGORITHM = "pretrain"

    def test_trains_without_an_inner_loop(self):
        self.assertEqual(self.steps, 0)
