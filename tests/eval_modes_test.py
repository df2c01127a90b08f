"""Evaluation modes: transductive (the paper's), support statistics, and one query at a time."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import maml_tf
from maml_tf.config import Config, ConfigError
from maml_tf.models import zoo


def _episode(seed, tasks=2, way=3, shot=2, queries=4):
    rng = np.random.default_rng(seed)
    sx = rng.normal(size=(tasks, way * shot, 12, 12, 1)).astype(np.float32)
    qx = rng.normal(size=(tasks, way * queries, 12, 12, 1)).astype(np.float32)
    sy = np.tile(np.repeat(np.arange(way), shot), (tasks, 1)).astype(np.int32)
    qy = np.tile(np.repeat(np.arange(way), queries), (tasks, 1)).astype(np.int32)
    return maml_tf.Episode(*(tf.constant(a) for a in (sx, sy, qx, qy)))


def _maml(norm="batch"):
    keras.utils.set_random_seed(0)
    return maml_tf.MAML(zoo.conv4((12, 12, 1), 3, filters=8, blocks=2, norm=norm),
                        inner_lr=0.4, inner_steps=2)


class EvalModesTest(tf.test.TestCase):

    def test_non_transductive_predictions_ignore_the_other_queries(self):
        learner = _maml()
        a = _episode(0)
        # The same tasks with every query but the first replaced.
        b = _episode(1)
        b = a._replace(query_x=tf.concat([a.query_x[:, :1], b.query_x[:, 1:]], 1))
        for mode in ("support", "per_example"):
            pa, pb = learner.predict_queries(a, mode=mode), learner.predict_queries(b, mode=mode)
            self.assertAllClose(pa[:, 0], pb[:, 0], atol=1e-6, msg=mode)
        # Transductive batch norm does mix them: the test above can fail.
        pa, pb = learner.predict_queries(a), learner.predict_queries(b)
        self.assertNotAllClose(pa[:, 0], pb[:, 0])

    def test_support_mode_normalises_queries_with_the_support_statistics(self):
        learner = _maml()
        ep = _episode(2)
        # A query equal to a support example gets exactly that example's output at the adapted
        # weights when normalised with the support statistics.
        q = ep._replace(query_x=ep.support_x[:, :3])
        fast = learner.adapt(ep.support_x, ep.support_y)
        with maml_tf.models.functional.inference():
            on_support = learner.predict(fast, ep.support_x)[:, :3]
        self.assertAllClose(learner.predict_queries(q, mode="support"), on_support, atol=1e-5)

    def test_transductive_is_the_default_evaluation(self):
        learner = _maml()
        ep = _episode(3)
        plain = learner.evaluate(ep)
        with maml_tf.models.functional.inference():
            moded = learner.eval_metrics_in_mode(learner.meta_weights(), ep, 2, "transductive")
        self.assertAllEqual(plain.loss, moded.loss)
        self.assertAllEqual(plain.accuracy, moded.accuracy)
        with maml_tf.models.functional.inference():
            per = learner.eval_metrics_in_mode(learner.meta_weights(), ep, 2, "per_example")
        self.assertNotAllClose(plain.loss, per.loss)   # the modes measure different things

    def test_per_example_for_an_embedding_learner_is_one_query_per_episode(self):
        keras.utils.set_random_seed(0)
        learner = maml_tf.ProtoNet(zoo.conv4((12, 12, 1), 3, filters=8, blocks=2), way=3)
        ep = _episode(4, queries=2)
        weights = learner.meta_weights()
        with maml_tf.models.functional.inference():
            per = learner.eval_metrics_in_mode(weights, ep, 0, "per_example")
            singles = [learner.eval_metrics(weights, ep._replace(query_x=ep.query_x[:, j:j + 1],
                                                                 query_y=ep.query_y[:, j:j + 1]), 0)
                       for j in range(ep.query_x.shape[1])]
        self.assertAllClose(per.loss, tf.reduce_mean(tf.stack([s.loss for s in singles]), 0),
                            atol=1e-5)
        self.assertAllClose(per.accuracy, tf.reduce_mean(tf.stack([s.accuracy for s in singles]), 0),
                            atol=1e-6)
        # Support mode: the queries' embeddings use the support set's statistics, so a query's
        # prediction ignores the other queries.
        other = ep._replace(query_x=tf.concat([ep.query_x[:, :1], _episode(5, queries=2).query_x[:, 1:]], 1))
        with maml_tf.models.functional.inference():
            learner._eval_mode = type("M", (), {"mode": "support"})()
            try:
                za = learner.embed_episode(weights, ep)[1]
                zb = learner.embed_episode(weights, other)[1]
            finally:
                learner._eval_mode = None
            sup = learner.eval_metrics_in_mode(weights, ep, 0, "support")
        self.assertAllClose(za[:, 0], zb[:, 0], atol=1e-5)
        self.assertEqual(sup.accuracy.shape, per.accuracy.shape)
        with self.assertRaisesRegex(ValueError, "use per_example"):
            maml_tf.CNP(maml_tf.models.zoo.mlp(1 + 128, [8], 2)).eval_metrics_in_mode(
                None, ep, 0, "support")

    def test_anil_and_relation_support_mode_ignores_the_other_queries(self):
        keras.utils.set_random_seed(0)
        net = lambda: zoo.conv4((12, 12, 1), 3, filters=8, blocks=2)
        anil = maml_tf.ANIL(net(), inner_lr=0.4, inner_steps=1)
        relation = maml_tf.RelationNet(net(), way=3)
        a = _episode(6, queries=3)
        b = a._replace(query_x=tf.concat([a.query_x[:, :1], _episode(7, queries=3).query_x[:, 1:]], 1))

        def anil_queries(ep, mode):
            with anil._evaluating_in(mode, ep):
                return anil._features(anil.meta_weights(), ep)[1].query_x

        def relation_scores(ep, mode):
            w = relation.meta_weights()
            with relation._evaluating_in(mode, ep):
                s, q = relation.embed_episode(w, ep)
                return relation.head(s, ep.support_y, q, relation.split(w)[1])

        with maml_tf.models.functional.inference():
            for fn in (anil_queries, relation_scores):
                self.assertAllClose(fn(a, "support")[:, 0], fn(b, "support")[:, 0], atol=1e-5,
                                    msg=fn.__name__)
                # Transductive batch norm mixes the queries, so the check above can fail.
                self.assertNotAllClose(fn(a, "transductive")[:, 0], fn(b, "transductive")[:, 0])
            for learner in (anil, relation):
                m = learner.eval_metrics_in_mode(learner.meta_weights(), a, 1, "support")
                self.assertTrue(np.all(np.isfinite(m.loss)))


def test_config_checks_the_mode_and_records_it():
    with pytest.raises(ConfigError, match="use --eval_mode=per_example"):
        Config(dataset="sinusoid", algorithm="cnp", eval_mode="support")
    for algorithm in ("protonet", "anil", "relation", "cnp"):       # supported
        Config(dataset="omniglot", algorithm=algorithm, eval_mode="support")
    with pytest.raises(ConfigError, match="eval_mode"):
        Config(dataset="omniglot", eval_mode="inductive")
    c = Config(dataset="omniglot", shot=1, eval_queries=15, eval_mode="per_example")
    assert (c.queries, c.test_queries) == (1, 15)
