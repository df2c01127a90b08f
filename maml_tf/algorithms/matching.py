"""Matching Networks (Vinyals et al. 2016): cosine attention over support embeddings, with
optional full context embeddings."""

from __future__ import annotations

import keras
import tensorflow as tf

from maml_tf.algorithms._embedding import EmbeddingLearner


class MatchingNet(EmbeddingLearner):
    """Matching Networks (Vinyals et al. 2016).

    A query ``x`` is labelled by attention over the support set:
    ``P(k | x) = sum_i a(x, x_i) [y_i = k]`` with ``a = softmax_i(cos(f(x), g(x_i)))``; the
    loss is ``-log P(y | x)`` and the logits are ``log P(k | x)`` (up to a constant per query).

    Without full context embeddings (``fce=False``) f and g are the network's body. With them
    (the paper's appendix): g is the body's embedding ``g'`` plus a bidirectional LSTM over the
    support set, ``g(x_i) = h_fwd_i + h_bwd_i + g'(x_i)``; f is an attention LSTM run for
    ``fce_steps`` steps on the query's embedding ``f'(x)``, reading the support set:
    ``h^_k, c_k = LSTM(f'(x), [h_{k-1}, r_{k-1}], c_{k-1})``, ``h_k = h^_k + f'(x)``,
    ``r_k = sum_i softmax_i(h_k . g(x_i)) g(x_i)`` (``h_0 = r_0 = c_0 = 0``), ``f = h_K``.
    The support set is read in the episode's order. The LSTMs' weights are the learner's
    ``extra`` tensors, meta-learned with the body.
    """

    def __init__(self, model, *, fce: bool = False, fce_steps: int = 5, **kwargs):
        super().__init__(model, **kwargs)
        self.fce = bool(fce)
        self.fce_steps = int(fce_steps)
        if self.fce:
            if self.fce_steps < 1:
                raise ValueError(f"Matching Networks need fce_steps >= 1, got {fce_steps}.")
            _, head = self.net.split_head()
            kernel = head.variables[0]
            if kernel.shape.rank != 2:
                raise ValueError("Full context embeddings need a body that outputs vectors "
                                 f"(a Dense head); the head's kernel has shape {kernel.shape}.")
            d, dt = int(kernel.shape[0]), kernel.dtype
            self.extra = (_lstm_variables("fce_fwd", d, d, d, dt)
                          + _lstm_variables("fce_bwd", d, d, d, dt)
                          + _lstm_variables("fce_att", d, 2 * d, d, dt))

    def head(self, support, support_y, query, extra):
        if self.fce:
            support = self.support_context(support, extra[0:3], extra[3:6])
            query = self.query_context(query, support, extra[6:9])
        cos = tf.matmul(tf.math.l2_normalize(query, -1), tf.math.l2_normalize(support, -1),
                        transpose_b=True)                                    # [T, Nq, Ns]
        onehot = tf.one_hot(support_y, self.way) > 0.5                       # [T, Ns, way]
        # log sum_{i in class k} exp(cos_i): log P(k | x) plus the query's log-normaliser.
        masked = tf.where(onehot[:, None, :, :], cos[..., None],
                          tf.constant(-1e9, cos.dtype))                      # [T, Nq, Ns, way]
        return tf.reduce_logsumexp(masked, axis=2)

    def support_context(self, g, forward, backward):
        """``g(x_i) = h_fwd_i + h_bwd_i + g'(x_i)``: g' ``[T, N_s, D]`` -> ``[T, N_s, D]``."""
        steps = tf.unstack(g, axis=1)
        fwd = _run_lstm(forward, steps)
        bwd = _run_lstm(backward, steps[::-1])[::-1]
        return g + tf.stack(fwd, 1) + tf.stack(bwd, 1)

    def query_context(self, f, g, weights):
        """The attention LSTM: query embeddings f' ``[T, N_q, D]`` and the support's
        g ``[T, N_s, D]`` -> ``[T, N_q, D]``."""
        h = tf.zeros_like(f)
        c = tf.zeros_like(f)
        r = tf.zeros_like(f)
        for _ in range(self.fce_steps):
            h_hat, c = _lstm_cell(weights, f, tf.concat([h, r], -1), c)
            h = h_hat + f
            attention = tf.nn.softmax(tf.matmul(h, g, transpose_b=True), axis=-1)
            r = tf.matmul(attention, g)
        return h


def _lstm_variables(name: str, inputs: int, state: int, d: int, dtype) -> list[tf.Variable]:
    """An LSTM of d units: kernel ``[inputs, 4 d]``, recurrent kernel ``[state, 4 d]``, bias
    ``[4 d]`` (gates in Keras's order i, f, c, o; forget bias 1)."""
    units = 4 * d
    glorot = keras.initializers.GlorotUniform()
    bias = tf.concat([tf.zeros([d], dtype), tf.ones([d], dtype), tf.zeros([2 * d], dtype)], 0)
    return [tf.Variable(tf.cast(glorot((inputs, units)), dtype), name=f"{name}_kernel"),
            tf.Variable(tf.cast(keras.initializers.Orthogonal()((state, units)), dtype),
                        name=f"{name}_recurrent"),
            tf.Variable(bias, name=f"{name}_bias")]


def _lstm_cell(weights, x, h, c):
    """One LSTM step on ``[..., inputs]`` with hidden input h and cell state c -> (h, c)."""
    kernel, recurrent, bias = weights
    gates = tf.matmul(x, kernel) + tf.matmul(h, recurrent) + bias
    i, f, g, o = tf.split(gates, 4, axis=-1)
    c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
    return tf.sigmoid(o) * tf.tanh(c), c


def _run_lstm(weights, steps):
    """Outputs of an LSTM (zero initial state) over a list of ``[T, D]`` inputs."""
    h = tf.zeros_like(steps[0])
    c = tf.zeros_like(steps[0])
    out = []
    for x in steps:
        h, c = _lstm_cell(weights, x, h, c)
        out.append(h)
    return out
