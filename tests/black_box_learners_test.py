"""The black-box learners' own checks: the Conditional Neural Process (and the learner
contract's promises on sinusoid tasks, where the contract's classification tests do not
apply: the loss falls, save/restore round-trips), the CNP classifier (mean class codes,
support order, relabelling), SNAIL and MANN (causality, the LRU memory,
metrics by shots seen, exact gradients). Their classification contract is in
learner_contract_test.py."""

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
from maml_tf.supervised import network
from maml_tf.harness import make_optimizer


def _cnp(dtype="float32", **kw):
    keras.utils.set_random_seed(0)
    config = Config.from_dict({"dataset": "sinusoid", "algorithm": "cnp", "shot": 5,
                               "meta_batch_size": 8, "meta_lr": 1e-3, **kw})
    return config, build_learner(config, network(config, dtype=dtype))


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
        def traced(ep):
            loss, grads, per_step = learner.meta_step(learner.meta_weights(), ep, 0)
            return loss, grads[:len(variables)], per_step.loss

        def step(ep):
            # Applied eagerly: see learner_contract_test.LearnerContract._train.
            loss, grads, per_step_loss = traced(ep)
            optimizer.apply(grads, variables)
            return loss, per_step_loss

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

    def test_evaluation_reports_the_mse_by_context_points_seen(self):
        _, learner = _cnp("float64")
        ep = _sinusoid_episode(3)
        m = learner.evaluate(ep)
        k_max = ep.support_x.shape[1]
        self.assertEqual(m.loss.shape, (ep.support_x.shape[0], k_max + 1))
        for k in range(1, k_max + 1):
            first = ep._replace(support_x=ep.support_x[:, :k], support_y=ep.support_y[:, :k])
            _, metrics = learner.meta_loss(learner.meta_weights(), first, 0)
            self.assertAllClose(m.loss[:, k], metrics.loss[:, 0], rtol=1e-12)
        # With no context the prediction ignores the support set.
        other = ep._replace(support_y=ep.support_y + 3.0)
        self.assertAllClose(learner.evaluate(other).loss[:, 0], m.loss[:, 0], rtol=1e-12)

    def test_on_sinusoid_builds_its_own_networks(self):
        with pytest.raises(ConfigError, match="builds its own encoder and decoder"):
            Config.from_dict({"dataset": "sinusoid", "algorithm": "cnp",
                              "model": "my_package.nets:build"})


def _cnp_classifier(dtype="float64", **kw):
    from algorithms_test import _config
    config = _config("cnp", **kw)
    return build_learner(config, network(config, dtype=dtype))


class CnpClassifierTest(tf.test.TestCase):

    def test_class_representation_is_the_mean_code_of_its_support_examples(self):
        learner = _cnp_classifier()
        self.assertEqual(type(learner).__name__, "CNPClassifier")
        ep = _episode_from(learner, 0)
        w = learner.meta_weights()
        extra = learner.split(w)[1]
        zs, _ = learner.embed_episode(w, ep)
        r = learner.class_representations(zs, ep.support_y, extra).numpy()
        codes = learner.encoder.apply(
            [tf.repeat(v[None], zs.shape[0], 0) for v in extra[:len(learner.encoder.variables)]],
            zs).numpy()
        y = ep.support_y.numpy()
        for t in range(r.shape[0]):
            for c in range(learner.way):
                self.assertAllClose(r[t, c], codes[t, y[t] == c].mean(0), rtol=1e-12)
        # A class with no support example has the empty set's representation, zero.
        keep = np.flatnonzero(y[0] != 0)
        r0 = learner.class_representations(tf.gather(zs[:1], keep, axis=1),
                                           tf.gather(ep.support_y[:1], keep, axis=1), extra)
        self.assertAllEqual(r0[0, 0], np.zeros(learner.representation))

    def test_support_order_does_not_matter_and_relabelling_permutes_the_logits(self):
        learner = _cnp_classifier()
        ep = _episode_from(learner, 1)
        w = learner.meta_weights()
        logits = learner.logits(w, ep).numpy()
        order = np.random.default_rng(0).permutation(ep.support_x.shape[1])
        shuffled = ep._replace(support_x=tf.gather(ep.support_x, order, axis=1),
                               support_y=tf.gather(ep.support_y, order, axis=1))
        self.assertAllClose(learner.logits(w, shuffled), logits, rtol=1e-10, atol=1e-12)
        # Class c of the support becomes class perm[c]: column perm[c] of the new logits is
        # column c of the old ones.
        perm = np.array([2, 0, 4, 1, 3])[:learner.way]
        relabelled = learner.logits(w, ep._replace(
            support_y=tf.gather(tf.constant(perm, tf.int32), ep.support_y))).numpy()
        self.assertAllClose(relabelled[..., perm], logits, rtol=1e-10, atol=1e-12)
        self.assertGreater(np.abs(relabelled - logits).max(), 1e-9)

    def test_meta_gradient_matches_finite_differences(self):
        learner = _cnp_classifier()
        n, ne = len(learner.net.variables), len(learner.encoder.variables)
        _fd_check(self, learner, _episode_from(learner, 2), 0, index=0)        # the body
        _fd_check(self, learner, _episode_from(learner, 2), 0, index=n)        # the encoder
        _fd_check(self, learner, _episode_from(learner, 2), 0, index=n + ne)   # the decoder

    def test_evaluation_by_shots_seen_equals_the_prediction_from_the_first_shots(self):
        learner = _cnp_classifier(norm="layer")
        ep = _episode_from(learner, 3)
        m = learner.evaluate(ep)
        way = learner.way
        self.assertEqual(m.accuracy.shape, (ep.support_x.shape[0], ep.support_x.shape[1] // way + 1))
        for shots in range(1, m.accuracy.shape[1]):
            first = ep._replace(support_x=ep.support_x[:, :way * shots],
                                support_y=ep.support_y[:, :way * shots])
            _, metrics = learner.meta_loss(learner.meta_weights(), first, 0)
            self.assertAllClose(m.loss[:, shots], metrics.loss[:, 0], rtol=1e-10)
        # With no shot every class has the same representation: the logits tie exactly, so
        # argmax takes the first class, one query in `way` of these balanced ones.
        self.assertAllClose(m.loss[:, 0], np.full(m.loss.shape[0], math.log(way)), rtol=1e-10)
        self.assertAllEqual(m.accuracy[:, 0], np.full(m.loss.shape[0], 1.0 / way))


def _snail(dtype="float32", **kw):
    from algorithms_test import _config
    config = _config("snail", **kw)
    return build_learner(config, network(config, dtype=dtype))


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

    def test_evaluation_by_shots_seen_reads_only_the_first_shots_of_each_class(self):
        learner = _snail("float64", norm="layer")
        ep = _episode_from(learner, 2)
        m = learner.evaluate(ep)
        self.assertEqual(m.accuracy.shape, (ep.support_x.shape[0], 3))
        # _episode's support is [0..way-1] twice: the first shot of every class comes first.
        # Changing the second shots changes the last column only; the labels, every column
        # but the one with no support.
        way = learner.way
        x = ep.support_x.numpy().copy()
        x[:, way:] = np.random.default_rng(0).uniform(size=x[:, way:].shape)
        again = learner.evaluate(ep._replace(support_x=tf.constant(x)))
        self.assertAllClose(again.loss[:, :2], m.loss[:, :2], rtol=1e-12)
        self.assertGreater(np.abs(again.loss[:, 2] - m.loss[:, 2]).max(), 1e-9)
        swapped = learner.evaluate(ep._replace(support_y=(ep.support_y + 1) % way))
        self.assertAllClose(swapped.loss[:, 0], m.loss[:, 0], rtol=1e-12)
        self.assertGreater(np.abs(swapped.loss[:, 1:] - m.loss[:, 1:]).max(), 1e-9)

    def test_evaluation_by_shots_seen_compiles_with_xla(self):
        # The evaluation step is XLA-compiled in training: shapes must stay static.
        learner = _snail()
        ep = _episode_from(learner, 3)
        compiled = tf.function(lambda w, e: learner.eval_metrics(w, e, 0).accuracy,
                               jit_compile=True)
        self.assertAllClose(compiled(learner.meta_weights(), ep), learner.evaluate(ep).accuracy)

    def test_other_shot_counts_are_refused(self):
        with pytest.raises(ConfigError, match="built for --shot"):
            Config.from_dict({"dataset": "omniglot", "algorithm": "snail", "shot": 1,
                              "eval_shots": (1, 5)})


def _episode_from(learner, seed):
    from algorithms_test import _episode
    return _episode(seed, dtype=learner.dtype.name)


def _mann(dtype="float64", norm="batch", **learner_kw):
    from algorithms_test import _config
    from maml_tf.algorithms import MANN
    config = _config("mann", norm=norm)
    return MANN(network(config, dtype=dtype), way=config.way, **learner_kw)


class MannTest(tf.test.TestCase):

    def test_memory_writes_follow_the_least_recently_used_rule(self):
        # One head, three slots, orthogonal keys, writes gated fully to the least-used slot
        # (alpha -> -inf): the first three writes fill slots 0, 1, 2 (ties go to the lowest
        # index); the fourth clears and overwrites slot 0, the least used by then (its usage
        # has decayed longest), and leaves the others as they were.
        learner = _mann(read_heads=1, slots=3, width=3, gamma=0.5)
        keys = np.eye(3)[[0, 1, 2, 0]] * [[1.0], [2.0], [3.0], [-4.0]]
        memory, usage, read_w = tf.zeros([1, 3, 3], tf.float64), tf.zeros([1, 3], tf.float64), \
            tf.zeros([1, 1, 3], tf.float64)
        alpha = tf.constant([[-1e3]], tf.float64)
        written, usages = [], []
        for k in keys:
            before = usage.numpy()[0]
            memory, usage, read_w, reads, write_w = learner.memory_step(
                memory, usage, read_w, tf.constant(k[None, None]), alpha)
            slot = int(np.argmax(write_w.numpy()[0, 0]))
            self.assertAllEqual(write_w.numpy()[0, 0], np.eye(3)[slot])
            written.append(slot)
            usages.append(before)
        self.assertEqual(written, [0, 1, 2, 0])
        self.assertEqual(int(np.argmin(usages[3])), 0)
        # Slot 0 holds the new key alone (cleared first, not added to the old one).
        self.assertAllClose(memory.numpy()[0], np.stack([keys[3], keys[1], keys[2]]), rtol=1e-12)
        # The read finds the key just written: cosine 1 against 0 for the orthogonal slots.
        expected = np.exp([1.0, 0.0, 0.0]) / np.exp([1.0, 0.0, 0.0]).sum()
        self.assertAllClose(read_w.numpy()[0, 0], expected, rtol=1e-12)
        self.assertAllClose(reads.numpy()[0, 0], expected @ memory.numpy()[0], rtol=1e-12)
        # Usage = gamma * usage + read + write weights.
        self.assertAllClose(usage.numpy()[0], 0.5 * usages[3] + expected + np.eye(3)[0],
                            rtol=1e-12)

    def test_a_gate_open_to_the_last_read_writes_where_it_read(self):
        learner = _mann(read_heads=1, slots=3, width=3)
        memory = tf.constant([[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 0]]], tf.float64)
        usage = tf.constant([[2.0, 1.0, 0.5]], tf.float64)
        read_w = tf.constant([[[0.7, 0.2, 0.1]]], tf.float64)
        key = tf.constant([[[0.0, 0.0, 5.0]]], tf.float64)
        new, _, _, _, write_w = learner.memory_step(memory, usage, read_w, key,
                                                    tf.constant([[1e3]], tf.float64))
        self.assertAllClose(write_w.numpy()[0, 0], [0.7, 0.2, 0.1], rtol=1e-12)
        # Slot 2, the least used, is cleared (it was empty), then every slot gets w * key.
        self.assertAllClose(new.numpy()[0], memory.numpy()[0] + np.outer([0.7, 0.2, 0.1],
                                                                         [0, 0, 5.0]))
        # With an add vector of its own the write stores it, and the read still uses the key.
        add = tf.constant([[[0.0, 2.0, 0.0]]], tf.float64)
        new, _, read_w, _, _ = learner.memory_step(memory, usage, read_w, key,
                                                   tf.constant([[1e3]], tf.float64), add)
        stored = memory.numpy()[0] + np.outer([0.7, 0.2, 0.1], [0, 2.0, 0])
        self.assertAllClose(new.numpy()[0], stored)
        # The key [0, 0, 5] is orthogonal to every slot now: uniform reads.
        self.assertAllClose(read_w.numpy()[0, 0], np.full(3, 1 / 3), rtol=1e-12)

    def test_the_paper_write_stores_the_key_and_has_no_add_weights(self):
        add, key = _mann(), _mann(write="key")
        self.assertEqual(len(add.extra), len(key.extra) + 2)
        ep = _episode_from(key, 4)
        support, query = key.predictions(key.meta_weights(), ep)
        self.assertTrue(np.all(np.isfinite(support.numpy())) and np.all(np.isfinite(query.numpy())))
        _fd_check(self, key, ep, 0, index=len(key.net.variables) + 2)   # keys read and written
        with self.assertRaisesRegex(ValueError, "write='value' is not one of"):
            _mann(write="value")

    def test_every_label_is_predicted_before_it_is_shown(self):
        # The support prediction at position t reads examples 0..t and labels 0..t-1 only;
        # the queries read the whole support set, each query on its own.
        learner = _mann(norm="layer")
        ep = _episode_from(learner, 0)
        w = learner.meta_weights()
        support, query = (v.numpy() for v in learner.predictions(w, ep))
        n = ep.support_y.shape[1]
        rng = np.random.default_rng(0)
        for t in range(n):
            labels = ep.support_y.numpy().copy()
            labels[:, t:] = rng.integers(0, learner.way, size=labels[:, t:].shape)
            images = ep.support_x.numpy().copy()
            images[:, t + 1:] = rng.uniform(size=images[:, t + 1:].shape)
            changed = ep._replace(support_x=tf.constant(images), support_y=tf.constant(labels))
            again, _ = learner.predictions(w, changed)
            self.assertAllClose(again.numpy()[:, :t + 1], support[:, :t + 1], rtol=1e-12)
        other = ep._replace(query_x=tf.concat([ep.query_x[:, :1], ep.query_x[:, 1:] + 0.5], 1))
        self.assertAllClose(learner.predictions(w, other)[1].numpy()[:, 0], query[:, 0],
                            rtol=1e-12)
        swapped = ep._replace(support_y=(ep.support_y + 1) % learner.way)
        self.assertGreater(np.abs(learner.predictions(w, swapped)[1].numpy() - query).max(), 1e-6)

    def test_evaluation_reports_accuracy_by_instance_number(self):
        learner = _mann()
        ep = _episode_from(learner, 2)
        support, query = learner.predictions(learner.meta_weights(), ep)
        right = (np.argmax(support.numpy(), -1) == ep.support_y.numpy())
        # _episode's support is [0..way-1] twice: positions < way are each class's first
        # instance, the rest its second; the last column is the queries.
        m = learner.evaluate(ep)
        way = learner.way
        self.assertAllClose(m.accuracy[:, 0], right[:, :way].mean(1))
        self.assertAllClose(m.accuracy[:, 1], right[:, way:].mean(1))
        q_right = np.argmax(query.numpy(), -1) == ep.query_y.numpy()
        self.assertAllClose(m.accuracy[:, 2], q_right.mean(1))
        self.assertAllEqual(_instances([[2, 0, 2, 2, 0, 1]]), [[0, 0, 1, 2, 1, 0]])

    def test_evaluation_compiles_with_xla(self):
        learner = _mann("float32")
        ep = _episode_from(learner, 3)
        compiled = tf.function(lambda w, e: learner.eval_metrics(w, e, 0).accuracy,
                               jit_compile=True)
        self.assertAllClose(compiled(learner.meta_weights(), ep), learner.evaluate(ep).accuracy)

    def test_meta_gradient_matches_finite_differences(self):
        learner = _mann()
        n = len(learner.net.variables)
        ep = _episode_from(learner, 1)
        _fd_check(self, learner, ep, 0, index=0)          # the body
        _fd_check(self, learner, ep, 0, index=n)          # the LSTM
        _fd_check(self, learner, ep, 0, index=n + 3)      # the keys (bias), through the reads
        _fd_check(self, learner, ep, 0, index=n + 5)      # the write gate (its bias)
        _fd_check(self, learner, ep, 0, index=n + 8)      # the add vectors, through the memory

    def test_the_support_sequence_is_shuffled_for_mann_only(self):
        from maml_tf.data import few_shot
        from maml_tf.data.classes import ClassImages
        images = ClassImages.from_grouped(np.arange(6 * 4 * 2 * 2, dtype=np.uint8).reshape(6, 4, 2, 2, 1))
        plain = few_shot.sample_task(images, 3, tf.constant(5, tf.int64), 3, 3, 1)
        mixed = few_shot.sample_task(images, 3, tf.constant(5, tf.int64), 3, 3, 1,
                                     shuffle_support=True)
        self.assertAllEqual(plain[1], np.repeat(np.arange(3), 3))
        self.assertNotAllEqual(mixed[1], plain[1])
        # The same (example, label) pairs, queries and classes: only the order differs.
        pairs = lambda x, y: sorted(map(tuple, np.concatenate(
            [x.numpy().reshape(9, -1), y.numpy()[:, None]], 1).tolist()))
        self.assertEqual(pairs(*mixed[:2]), pairs(*plain[:2]))
        for a, b in zip(plain[2:], mixed[2:]):
            self.assertAllEqual(a, b)
        self.assertTrue(Config.from_dict({"dataset": "omniglot", "algorithm": "mann"}
                                         ).shuffled_support)
        self.assertFalse(Config.from_dict({"dataset": "omniglot"}).shuffled_support)
        with pytest.raises(ConfigError, match="few-shot classifier"):
            Config.from_dict({"dataset": "sinusoid", "algorithm": "mann"})


def _instances(labels):
    from maml_tf.algorithms._embedding import instances_seen
    return instances_seen(tf.constant(labels, tf.int32), 3).numpy()
