"""SNAIL (Mishra et al. 2018): a black-box learner that reads the support set as a sequence,
with temporal convolutions and causal attention, and labels the query at its end."""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from maml_tf.algorithms._embedding import EmbeddingLearner


class SNAIL(EmbeddingLearner):
    """Simple Neural AttentIve meta-Learner (Mishra et al. 2018), few-shot classification.

    For every query, the sequence is the task's support examples, each as (embedding, one-hot
    label), then the query as (embedding, zeros); the embedding is the network's body (the
    Conv-4 of the other learners). The paper's Omniglot architecture reads it:
    ``Attention(64, 32) -> TC(128) -> Attention(256, 128) -> TC(128) -> Attention(512, 256)``,
    then a linear map to the way's logits at the last position. A TC block is
    ``ceil(log2 L)`` dense blocks of dilation 1, 2, 4, ... (a causal convolution of kernel 2,
    gated ``tanh * sigmoid``, concatenated to its input); an attention block appends a causal
    softmax read (``key`` and ``value`` sizes) to its input. Every position sees only itself
    and earlier positions, so the query's label comes from the support set and the query alone.
    The sequence weights are the learner's ``extra`` tensors.

    Evaluation (``eval_metrics``) reports the query metrics by shots seen: column i reads only
    the first i support examples of each class (in the episode's order), i = 0..shot; the
    last column is the usual prediction.
    """

    metric_axis = "shots_seen"

    def __init__(self, model, *, shot: int = 1, **kwargs):
        super().__init__(model, **kwargs)
        kernel = self.vector_head_kernel()
        self.embedding_dim = int(kernel.shape[0])
        self.dtype = tf.as_dtype(kernel.dtype)
        # The TC blocks' depth depends on the sequence length: way * shot support examples
        # and the query. A SNAIL is built for one shot count.
        self.support_size = self.way * int(shot)
        self._build(self.support_size + 1)

    def _build(self, length: int) -> None:
        self.depth = max(1, math.ceil(math.log2(length)))   # dense blocks per TC block
        d = self.embedding_dim + self.way
        specs = []

        def attention(d, key, value):
            specs.extend([("query", (d, key)), ("key", (d, key)), ("value", (d, value))])
            return d + value

        def tc(d, filters):
            for _ in range(self.depth):
                specs.extend([("filter_past", (d, filters)), ("filter_now", (d, filters)),
                              ("filter_bias", (filters,)), ("gate_past", (d, filters)),
                              ("gate_now", (d, filters)), ("gate_bias", (filters,))])
                d += filters
            return d

        d = attention(d, 64, 32)
        d = tc(d, 128)
        d = attention(d, 256, 128)
        d = tc(d, 128)
        d = attention(d, 512, 256)
        specs.extend([("out_kernel", (d, self.way)), ("out_bias", (self.way,))])
        glorot = keras.initializers.GlorotUniform()
        self._specs = specs
        self.extra = [tf.Variable(tf.zeros(shape, self.dtype) if len(shape) == 1
                                  else tf.cast(glorot(shape), self.dtype),
                                  name=f"snail_{i}_{name}")
                      for i, (name, shape) in enumerate(specs)]

    def head(self, support, support_y, query, extra):
        t, ns, nq = support.shape[0], support.shape[1], query.shape[1]
        if ns > self.support_size:
            raise ValueError(f"This SNAIL was built for {self.support_size} support examples "
                             f"per task (way x shot); the episode has {ns}.")
        labels = tf.one_hot(support_y, self.way, dtype=support.dtype)
        seq_support = tf.concat([support, labels], -1)                   # [T, Ns, D + way]
        seq_query = tf.concat([query, tf.zeros([t, nq, self.way], query.dtype)], -1)
        # One sequence per query: [T * Nq, Ns + 1, D + way].
        seq = tf.concat([tf.repeat(seq_support[:, None], nq, axis=1), seq_query[:, :, None]], 2)
        seq = tf.reshape(seq, [t * nq, ns + 1, seq.shape[-1]])
        out = self.sequence(seq, extra)
        return tf.reshape(out[:, -1], [t, nq, self.way])

    def eval_metrics(self, weights, episode, steps):
        return self.metrics_by_shots_seen(weights, episode)

    def sequence(self, x: tf.Tensor, extra) -> tf.Tensor:
        """The network on sequences ``[B, L, D + way]`` -> logits ``[B, L, way]`` (causal;
        L up to the built length)."""
        weights = iter(extra[:len(self._specs)])
        length = x.shape[1]

        def attention(x, key):
            wq, wk, wv = next(weights), next(weights), next(weights)
            logits = tf.matmul(x @ wq, x @ wk, transpose_b=True) / math.sqrt(key)
            causal = tf.linalg.band_part(tf.ones([length, length], tf.bool), -1, 0)
            logits = tf.where(causal, logits, tf.constant(-1e9, logits.dtype))
            return tf.concat([x, tf.nn.softmax(logits, -1) @ (x @ wv)], -1)

        def tc(x):
            # As many blocks as built, whatever this sequence's length (evaluation by shots
            # seen reads shorter ones): a dilation beyond the length reads only padding.
            for i in range(self.depth):
                dilation = 2 ** i
                fp, fn, fb, gp, gn, gb = (next(weights) for _ in range(6))
                past = tf.pad(x, [[0, 0], [dilation, 0], [0, 0]])[:, :length]
                f = tf.tanh(past @ fp + x @ fn + fb)
                g = tf.sigmoid(past @ gp + x @ gn + gb)
                x = tf.concat([x, f * g], -1)
            return x

        x = attention(x, 64)
        x = tc(x)
        x = attention(x, 256)
        x = tc(x)
        x = attention(x, 512)
        return x @ next(weights) + next(weights)
