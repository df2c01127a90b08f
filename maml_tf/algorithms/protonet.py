"""Prototypical Networks (Snell et al. 2017): nearest class mean of embeddings, no inner loop."""

from __future__ import annotations

import tensorflow as tf

from maml_tf.meta_learner import MetaLearner, StepMetrics
from maml_tf.models.functional import tile_for_tasks


class ProtoNet(MetaLearner):
    """Prototypical Networks (Snell et al. 2017) on the network's body (Conv-4 without its
    head, whose weights stay unused): each query is classified by the negative squared
    Euclidean distance of its embedding to the class means of the support embeddings.
    There is no inner loop, so ``StepMetrics`` has a single column."""

    SECOND_ORDER = False   # no inner loop

    def __init__(self, model, *, way: int | None = None, **kwargs):
        super().__init__(model, **kwargs)
        self.body, head = self.net.split_head()
        # The head (unused) was built for the task's classes: its outputs are the way.
        self.way = int(way or head.variables[-1].shape[-1])

    @property
    def reports_inner_steps(self):
        return False

    def inner_loop(self, weights, x, y, steps, first_order=None):
        raise NotImplementedError("ProtoNets has no inner loop: use meta_gradient, evaluate "
                                  "or meta_loss.")

    def meta_loss(self, weights, episode, steps, first_order=None, track_steps=True,
                  iteration=None):
        nb = len(self.body.variables)
        body = tile_for_tasks(weights[:nb], episode.support_x.shape[0])
        embed = lambda x: self.apply_in_compute_dtype(self.body, body, x)
        zs, zq = embed(episode.support_x), embed(episode.query_x)        # [T, N, D]
        onehot = tf.one_hot(episode.support_y, self.way)                 # [T, Ns, way]
        protos = tf.matmul(onehot, zs, transpose_a=True) / tf.reduce_sum(onehot, 1)[..., None]
        sq = (tf.reduce_sum(tf.square(zq), -1, keepdims=True)             # [T, Nq, way]
              - 2.0 * tf.matmul(zq, protos, transpose_b=True)
              + tf.reduce_sum(tf.square(protos), -1)[:, None, :])
        loss = self.loss_fn(-sq, episode.query_y)
        per_step = StepMetrics(loss[:, None], self.metric_fn(-sq, episode.query_y)[:, None])
        return tf.reduce_mean(loss), per_step
