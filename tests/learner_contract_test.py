"""The learner test contract: every meta-learning algorithm inherits ``LearnerContract``
and passes it (accuracy at init ~ 1/way, the meta-loss falls, one episode can be
overfitted, save/restore round-trips, per-step metrics are reported).

A new algorithm adds a subclass that sets ``ALGORITHM`` (and its own specific checks).
"""

import numpy as np
import tensorflow as tf
import keras

from maml_tf.data.episode import Episode
from maml_tf.config import Config
from maml_tf.algorithms import build_learner, train_inner_steps
from maml_tf.harness import make_optimizer
from maml_tf.models import get_model

WAY, SHOT, QUERY, TASKS, CLASSES = 5, 2, 3, 4, 20


def _separable_episode(seed: int) -> Episode:
    """Tasks whose classes are distinct random prototypes plus noise: learnable in a few
    steps. Each task draws WAY of CLASSES global classes (``Episode.classes``)."""
    rng = np.random.default_rng(seed)
    protos = rng.uniform(size=(CLASSES, 28, 28, 1)).astype("float32")
    classes = np.stack([rng.permutation(CLASSES)[:WAY] for _ in range(TASKS)])

    def part(n):
        y = np.tile(np.arange(WAY), n)
        x = protos[classes[:, y]] + 0.1 * rng.normal(size=(TASKS, WAY * n, 28, 28, 1)).astype("float32")
        return tf.constant(x), tf.constant(np.broadcast_to(y, (TASKS, WAY * n)).astype("int32"))
    return Episode(*part(SHOT), *part(QUERY), tf.constant(classes.astype("int32")))


def _noise_episode(seed: int) -> Episode:
    """Images of pure noise: no query can be told from another, whatever the support."""
    rng = np.random.default_rng(seed)

    def part(n):
        x = rng.uniform(size=(TASKS, WAY * n, 28, 28, 1)).astype("float32")
        y = np.broadcast_to(np.tile(np.arange(WAY), n), (TASKS, WAY * n)).astype("int32")
        return tf.constant(x), tf.constant(y)
    classes = np.stack([rng.permutation(CLASSES)[:WAY] for _ in range(TASKS)]).astype("int32")
    return Episode(*part(SHOT), *part(QUERY), tf.constant(classes))


class LearnerContract:
    """Mixed into a ``tf.test.TestCase`` by each algorithm's test class."""
    ALGORITHM: str
    OVERRIDES: dict = {}

    def setUp(self):
        super().setUp()
        keras.utils.set_random_seed(0)
        self.config = Config.from_dict({"dataset": "omniglot", "algorithm": self.ALGORITHM,
                                        "way": WAY, "shot": SHOT, "query": QUERY,
                                        "num_filters": 16, "inner_lr": 0.4,
                                        "meta_batch_size": TASKS, "meta_lr": 3e-3,
                                        **self.OVERRIDES})
        self.model, self.learner = self._build()
        self.optimizer = make_optimizer(self.config)
        self.steps = train_inner_steps(self.config)

    def _build(self):
        model = get_model(self.config)
        return model, build_learner(self.config, model, num_classes=CLASSES)

    def _train(self, episode, iterations):
        variables = self.learner.meta_variables

        # The update is applied outside the traced function: a Keras optimizer's apply()
        # traced inside a tf.function keeps that function's graphs alive for the life of the
        # process (measured: +50 MB per test, the largest part of the suite's memory growth).
        @tf.function
        def step(ep, iteration, first_order):
            loss, grads, per_step = self.learner.meta_step(
                self.learner.meta_weights(), ep, self.steps, iteration, first_order)
            return (loss, grads[:len(variables)], per_step.loss, per_step.accuracy,
                    list(per_step.state_update or []))

        history = []
        for i in range(iterations):
            loss, grads, step_loss, step_acc, state = step(
                episode, tf.constant(i, tf.float32), self.learner.first_order_at(i))
            self.optimizer.apply(grads, variables)
            if state:
                self.learner.update_state(state)
            history.append((loss, step_loss, step_acc))
        return history

    def _columns(self, steps):
        return steps + 1 if self.learner.reports_inner_steps else 1

    def test_accuracy_at_initialisation_is_about_one_over_way(self):
        # On noise every column (before and after adaptation) is at chance: nothing leaks
        # from the query labels into the predictions.
        accs = []
        for seed in range(5):
            _, per_step = self.learner.meta_loss(self.learner.meta_weights(),
                                                 _noise_episode(seed), 2)
            self.assertEqual(per_step.accuracy.shape, (TASKS, self._columns(2)))
            accs.append(float(tf.reduce_mean(per_step.accuracy)))
        self.assertAllClose(np.mean(accs), 1.0 / WAY, atol=0.12)

    def test_accuracy_before_adaptation_is_about_one_over_way(self):
        # Learnable tasks too: labels are permuted per task, so an unadapted network is at
        # chance. (ProtoNets has no "before": its only classifier is built from the support.)
        if not self.learner.reports_inner_steps:
            self.skipTest("no pre-adaptation classifier (prototypes come from the support set)")
        accs = []
        for seed in range(5):
            _, per_step = self.learner.meta_loss(self.learner.meta_weights(),
                                                 _separable_episode(seed), 0)
            accs.append(float(tf.reduce_mean(per_step.accuracy)))
        self.assertAllClose(np.mean(accs), 1.0 / WAY, atol=0.12)

    def test_meta_loss_falls_and_one_episode_is_overfitted(self):
        # One training run for both promises: each run traces the meta-step anew, which is
        # most of a contract's time.
        episode = _separable_episode(2)
        history = self._train(episode, 60)
        first = float(history[0][0])
        self.assertLess(float(np.mean([h[0] for h in history[12:15]])), 0.8 * first)
        final_acc = float(tf.reduce_mean(history[-1][2][:, -1]))
        self.assertGreater(final_acc, 0.95)
        # ... and so does the learner's evaluation path (which may use learned state).
        _, per_step = self.learner.meta_loss(self.learner.meta_weights(), episode,
                                             max(self.steps, 1))
        self.assertGreater(float(tf.reduce_mean(per_step.accuracy[:, -1])), 0.9)

    def test_reports_metrics_for_every_inner_step(self):
        _, per_step = self.learner.meta_loss(self.learner.meta_weights(),
                                             _separable_episode(3), 3)
        self.assertEqual(per_step.loss.shape, (TASKS, self._columns(3)))
        self.assertEqual(per_step.accuracy.shape, (TASKS, self._columns(3)))
        self.assertTrue(np.all(np.isfinite(per_step.loss.numpy())))

    def test_scoring_the_last_step_only_gives_the_same_update(self):
        # Meta-training scores every inner step's queries on one meta-step in
        # --step_metrics_every only: the others must compute exactly the same update.
        ep, steps = _separable_episode(6), max(self.steps, 2)
        weights = self.learner.meta_weights()
        loss, grads, every = self.learner.meta_step(weights, ep, steps)
        loss_last, grads_last, last = self.learner.meta_step(weights, ep, steps,
                                                             track_steps=False)
        self.assertAllClose(loss_last, loss, rtol=1e-6)
        for a, b in zip(grads_last, grads):
            self.assertAllClose(a, b, rtol=1e-5, atol=1e-7)
        self.assertEqual(last.loss.shape, (TASKS, 1))
        self.assertAllClose(last.loss[:, 0], every.loss[:, -1], rtol=1e-6)
        self.assertAllClose(last.accuracy[:, 0], every.accuracy[:, -1])

    def test_evaluation_reports_metrics_along_its_axis(self):
        # After 0..S inner steps, after 0..K shots seen (black-box learners), or one column;
        # for a black-box learner the last column is the prediction from the whole support.
        ep = _separable_episode(3)
        per_step = self.learner.evaluate(ep, steps=2)
        columns = {"inner_steps": 3, "shots_seen": SHOT + 1, None: 1}[self.learner.metric_axis]
        self.assertEqual(per_step.loss.shape, (TASKS, columns))
        self.assertEqual(per_step.accuracy.shape, (TASKS, columns))
        self.assertTrue(np.all(np.isfinite(per_step.loss.numpy())))
        if self.learner.metric_axis == "shots_seen":
            _, full = self.learner.meta_loss(self.learner.meta_weights(), ep, 2)
            self.assertAllClose(per_step.accuracy[:, -1], full.accuracy[:, -1])
            self.assertAllClose(per_step.loss[:, -1], full.loss[:, -1], rtol=1e-5)

    def test_save_restore_round_trip(self):
        self._train(_separable_episode(4), 2)
        path = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer,
                                   learner=self.learner).save(self.get_temp_dir() + "/ckpt")
        saved = [w.numpy() for w in self.learner.meta_weights()]   # with the learner's state
        keras.utils.set_random_seed(1)
        model, learner = self._build()
        optimizer = make_optimizer(self.config)
        optimizer.build(learner.meta_variables)
        tf.train.Checkpoint(model=model, optimizer=optimizer, learner=learner).restore(
            path).assert_consumed()
        restored = learner.meta_weights()
        self.assertLen(restored, len(saved))
        for a, b in zip(saved, restored):
            self.assertAllEqual(a, b.numpy())
        ep = _separable_episode(5)
        a, _ = self.learner.meta_loss(self.learner.meta_weights(), ep, 1)
        b, _ = learner.meta_loss(learner.meta_weights(), ep, 1)
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


class ReptileContractTest(LearnerContract, tf.test.TestCase):
    ALGORITHM = "reptile"


class ReptilePaperSettingsContractTest(LearnerContract, tf.test.TestCase):
    """Reptile as the paper runs it: Adam (beta1 = 0) inside, SGD outside with an annealed
    outer step size."""
    ALGORITHM = "reptile"
    OVERRIDES = {"inner_optimizer": "adam", "inner_lr": 0.01, "inner_steps": 3,
                 "meta_optimizer": "sgd", "meta_lr": 1.0, "meta_lr_schedule": "linear",
                 "num_iterations": 200}


class MetaSgdContractTest(LearnerContract, tf.test.TestCase):
    ALGORITHM = "metasgd"


class AnilContractTest(LearnerContract, tf.test.TestCase):
    ALGORITHM = "anil"


class MamlPlusPlusContractTest(LearnerContract, tf.test.TestCase):
    ALGORITHM = "mamlpp"
    OVERRIDES = {"inner_steps": 2, "lslr": True, "bnwb": True, "bnrs": True,
                 "msl_iterations": 10, "da_iterations": 5, "meta_lr_schedule": "cosine",
                 "num_iterations": 100}


class ProtoNetContractTest(LearnerContract, tf.test.TestCase):
    ALGORITHM = "protonet"


class BoilContractTest(LearnerContract, tf.test.TestCase):
    ALGORITHM = "boil"


class CaviaContractTest(LearnerContract, tf.test.TestCase):
    ALGORITHM = "cavia"
    OVERRIDES = {"context_dim": 8}


class ImamlContractTest(LearnerContract, tf.test.TestCase):
    ALGORITHM = "imaml"
    OVERRIDES = {"cg_steps": 2}   # its exactness is tests/optimization_learners_test.py's


class R2D2ContractTest(LearnerContract, tf.test.TestCase):
    ALGORITHM = "r2d2"


class MetaOptNetContractTest(LearnerContract, tf.test.TestCase):
    ALGORITHM = "metaoptnet"


class MatchingNetContractTest(LearnerContract, tf.test.TestCase):
    ALGORITHM = "matching"


class MatchingNetFceContractTest(LearnerContract, tf.test.TestCase):
    ALGORITHM = "matching"
    OVERRIDES = {"fce": True}


class RelationNetContractTest(LearnerContract, tf.test.TestCase):
    ALGORITHM = "relation"


class SnailContractTest(LearnerContract, tf.test.TestCase):
    ALGORITHM = "snail"


class MannContractTest(LearnerContract, tf.test.TestCase):
    ALGORITHM = "mann"


class CnpClassifierContractTest(LearnerContract, tf.test.TestCase):
    ALGORITHM = "cnp"
