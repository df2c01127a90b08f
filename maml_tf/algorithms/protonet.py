"""Prototypical Networks (Snell et al. 2017): nearest class mean of embeddings, no inner loop."""

from __future__ import annotations

import tensorflow as tf

from maml_tf.algorithms._embedding import EmbeddingLearner, class_sums


class ProtoNet(EmbeddingLearner):
    """Prototypical Networks (Snell et al. 2017) on the network's body (Conv-4 without its
    head, whose weights stay unused): each query is classified by the negative squared
    Euclidean distance of its embedding to the class means of the support embeddings."""

    def head(self, support, support_y, query, extra):
        sums, counts = class_sums(support, support_y, self.way)
        protos = sums / counts[..., None]                                # [T, way, D]
        sq = (tf.reduce_sum(tf.square(query), -1, keepdims=True)          # [T, Nq, way]
              - 2.0 * tf.matmul(query, protos, transpose_b=True)
              + tf.reduce_sum(tf.square(protos), -1)[:, None, :])
        return -sq
