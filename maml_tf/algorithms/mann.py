"""MANN (Santoro et al. 2016): a black-box learner that reads a task's examples one at a time,
each with the previous example's label, through an LSTM controller with an external memory
written by least-recently-used access (LRUA), and predicts every label before it is shown."""

from __future__ import annotations

import keras
import tensorflow as tf

from maml_tf.algorithms._embedding import EmbeddingLearner, instances_seen
from maml_tf.config import MANN_WRITES
from maml_tf.data.episode import Episode
from maml_tf.meta_learner import StepMetrics


class MANN(EmbeddingLearner):
    """Memory-Augmented Neural Network with LRUA memory (Santoro et al. 2016), few-shot
    classification.

    The support set is one sequence, in the episode's order (the data pipeline shuffles it
    for ``--algorithm=mann``, so the classes interleave as in the paper): at time t the
    controller reads the embedding of example t and the one-hot label of example t-1, and
    predicts the label of example t. Every query is then predicted from the state after the
    whole support sequence (with the last support label as its label input), each query on
    its own, so queries never see each other.

    One time step, with ``R`` read heads, ``N`` memory slots of width ``W`` and usage decay
    ``gamma`` (the paper's equations; ``lu`` marks the ``R`` least-used slots of the previous
    usage, ties to the lowest index)::

        h, c  = LSTM([embedding_t, label_{t-1}, reads_{t-1}], h, c)
        k     = tanh(h W_k + b_k)              [R, W]   one key per head
        a     = tanh(h W_v + b_v)              [R, W]   what each head writes (write="add")
        alpha = h W_g + b_g                    [R]
        M[argmin usage] = 0                             the least-used slot is cleared
        w_w   = sigmoid(alpha) w_r_{t-1} + (1 - sigmoid(alpha)) lu       [R, N]
        M    += w_w^T a                                 write
        w_r   = softmax(cosine(k, M))          [R, N]   read
        reads = w_r M                          [R, W]
        usage = gamma usage + sum_heads(w_r + w_w)
        logits_t = [h, reads] W_o + b_o

    ``write`` chooses what is written. The paper's equation writes the read key itself
    (``write="key"``: ``a = k``), so one vector must both find the current image's slot and
    carry the previous label to the slot read last. ``write="add"`` (the default) gives the
    write its own vector, as the Neural Turing Machine's add vector and the public
    re-implementations of this paper do: on a toy task of fresh random prototypes per episode
    (5 ways, 10 instances, batch 16; ``benchmarks/mann_write.py``) it reached 92% on the 10th
    instance after 1,500 iterations, the key write 55%; on Omniglot the key write stayed at
    chance after 22,000 episodes (runs/README.md, MANN).

    The images enter through the network's body (the Conv-4 of the other learners; the paper
    fed raw pixels). ``StepMetrics`` in training has one column (the queries); evaluation
    (``eval_metrics``) reports metrics by the number of examples of the class seen before the
    prediction: column i < shot holds the support predictions of each class's (i+1)-th
    instance (the paper's accuracy by instance number), column ``shot`` the queries.
    The training loss is the mean cross-entropy over every prediction, support and query.
    The controller, key, gate, output (and add) weights are the learner's ``extra`` tensors.
    """

    metric_axis = "shots_seen"

    def __init__(self, model, *, units: int = 200, slots: int = 128, width: int = 40,
                 read_heads: int = 4, gamma: float = 0.95, write: str = "add", **kwargs):
        super().__init__(model, **kwargs)
        if write not in MANN_WRITES:
            raise ValueError(f"MANN's write={write!r} is not one of {MANN_WRITES}.")
        self.write = write
        kernel = self.vector_head_kernel()
        if read_heads > slots:
            raise ValueError(f"MANN's {read_heads} read heads need at least as many memory "
                             f"slots; got {slots}.")
        self.units, self.slots, self.width = int(units), int(slots), int(width)
        self.read_heads, self.gamma = int(read_heads), float(gamma)
        self.dtype = dtype = tf.as_dtype(kernel.dtype)
        inputs = int(kernel.shape[0]) + self.way + self.read_heads * self.width
        glorot = keras.initializers.GlorotUniform()
        r, u = self.read_heads, self.units
        shapes = {"lstm_kernel": (inputs + u, 4 * u), "lstm_bias": (4 * u,),
                  "key_kernel": (u, r * self.width), "key_bias": (r * self.width,),
                  "gate_kernel": (u, r), "gate_bias": (r,),
                  "out_kernel": (u + r * self.width, self.way), "out_bias": (self.way,)}
        if write == "add":
            shapes.update(add_kernel=(u, r * self.width), add_bias=(r * self.width,))
        # Kernels Glorot-uniform, biases zero except the LSTM's forget gate, which starts open
        # (bias 1), as is usual.
        forget = tf.concat([tf.zeros([u]), tf.ones([u]), tf.zeros([2 * u])], 0)
        self.extra = [tf.Variable(tf.cast(glorot(s), dtype) if len(s) == 2 else
                                  tf.cast(forget, dtype) if name == "lstm_bias" else
                                  tf.zeros(s, dtype), name=f"mann_{name}")
                      for name, s in shapes.items()]

    # -- the memory ---------------------------------------------------------------------
    def initial_state(self, batch: int, dtype) -> tuple:
        """(h, c, memory, usage, read weights, reads) for ``batch`` sequences, all zeros."""
        r, n, w = self.read_heads, self.slots, self.width
        return (tf.zeros([batch, self.units], dtype), tf.zeros([batch, self.units], dtype),
                tf.zeros([batch, n, w], dtype), tf.zeros([batch, n], dtype),
                tf.zeros([batch, r, n], dtype), tf.zeros([batch, r * w], dtype))

    def memory_step(self, memory, usage, read_w, keys, alpha, adds=None):
        """One LRUA write then read.

        memory ``[B, N, W]``, usage ``[B, N]``, read_w ``[B, R, N]`` (the previous step's),
        keys ``[B, R, W]``, alpha ``[B, R]``, adds ``[B, R, W]`` (what is written; the keys
        when None) -> (memory, usage, read_w, reads ``[B, R, W]``, write_w ``[B, R, N]``).
        """
        n = self.slots
        # The least-used slots come from the previous usage; they are indices, constant for
        # the gradient, as in the paper.
        _, least = tf.math.top_k(-usage, k=self.read_heads)                 # [B, R]
        lu = tf.reduce_sum(tf.one_hot(least, n, dtype=memory.dtype), 1)    # [B, N]
        memory = memory * (1.0 - tf.one_hot(least[:, 0], n, dtype=memory.dtype))[:, :, None]
        gate = tf.sigmoid(alpha)[:, :, None]
        write_w = gate * read_w + (1.0 - gate) * lu[:, None, :]
        memory = memory + tf.matmul(write_w, keys if adds is None else adds, transpose_a=True)
        eps = tf.constant(1e-8, memory.dtype)
        # Norms through sqrt(x + eps): a cleared slot has norm 0, where tf.norm's gradient
        # is NaN.
        key_norm = tf.sqrt(tf.reduce_sum(tf.square(keys), -1, keepdims=True) + eps)
        slot_norm = tf.sqrt(tf.reduce_sum(tf.square(memory), -1) + eps)    # [B, N]
        cosine = tf.matmul(keys, memory, transpose_b=True) / (key_norm * slot_norm[:, None, :])
        read_w = tf.nn.softmax(cosine, -1)
        reads = tf.matmul(read_w, memory)
        usage = self.gamma * usage + tf.reduce_sum(read_w + write_w, 1)
        return memory, usage, read_w, reads, write_w

    def step(self, extra, state, x):
        """One time step: state (see ``initial_state``), x ``[B, D + way]`` -> (logits
        ``[B, way]``, new state)."""
        lstm_kernel, lstm_bias, key_kernel, key_bias, gate_kernel, gate_bias, out_kernel, \
            out_bias = extra[:8]
        h, c, memory, usage, read_w, reads = state
        gates = tf.concat([x, reads, h], -1) @ lstm_kernel + lstm_bias
        i, f, g, o = tf.split(gates, 4, -1)
        c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
        h = tf.sigmoid(o) * tf.tanh(c)
        heads = [-1, self.read_heads, self.width]
        keys = tf.reshape(tf.tanh(h @ key_kernel + key_bias), heads)
        adds = None
        if self.write == "add":
            add_kernel, add_bias = extra[8:10]
            adds = tf.reshape(tf.tanh(h @ add_kernel + add_bias), heads)
        memory, usage, read_w, reads, _ = self.memory_step(memory, usage, read_w, keys,
                                                           h @ gate_kernel + gate_bias, adds)
        reads = tf.reshape(reads, [-1, self.read_heads * self.width])
        logits = tf.concat([h, reads], -1) @ out_kernel + out_bias
        return logits, (h, c, memory, usage, read_w, reads)

    # -- episodes -----------------------------------------------------------------------
    def predictions(self, weights, episode: Episode) -> tuple[tf.Tensor, tf.Tensor]:
        """(support logits ``[T, N_s, way]``, each predicted before its label was shown;
        query logits ``[T, N_q, way]``, each after the whole support sequence)."""
        extra = self.split(weights)[1]
        zs, zq = self.embed_episode(weights, episode)
        t, ns, nq = zs.shape[0], zs.shape[1], zq.shape[1]
        labels = tf.one_hot(episode.support_y, self.way, dtype=zs.dtype)
        previous = tf.concat([tf.zeros_like(labels[:, :1]), labels[:, :-1]], 1)
        sequence = tf.transpose(tf.concat([zs, previous], -1), [1, 0, 2])   # [N_s, T, D+way]

        def scan_fn(carry, x):
            logits, state = self.step(extra, carry[1], x)
            return logits, state

        first = self.step(extra, self.initial_state(t, zs.dtype), sequence[0])
        if ns > 1:
            logits, states = tf.scan(scan_fn, sequence[1:], initializer=first)
            support_logits = tf.concat([first[0][None], logits], 0)
            final = tuple(s[-1] for s in states)
        else:
            support_logits, final = first[0][None], first[1]
        support_logits = tf.transpose(support_logits, [1, 0, 2])
        # Every query continues the final state on its own: [T * N_q, ...].
        tiled = tuple(tf.reshape(tf.repeat(s[:, None], nq, axis=1), [t * nq] + s.shape[1:])
                      for s in final)
        last = tf.repeat(labels[:, -1:], nq, axis=1)
        query_in = tf.reshape(tf.concat([zq, last], -1), [t * nq, -1])
        query_logits, _ = self.step(extra, tiled, query_in)
        return support_logits, tf.reshape(query_logits, [t, nq, self.way])

    def query_predictions(self, weights, episode, steps):
        return self.predictions(weights, episode)[1]

    def _losses(self, weights, episode):
        support, query = self.predictions(weights, episode)
        ce = lambda logits, y: tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)
        right = lambda logits, y: tf.cast(tf.equal(tf.argmax(logits, -1, output_type=y.dtype), y),
                                          logits.dtype)
        return (ce(support, episode.support_y), ce(query, episode.query_y),
                right(support, episode.support_y), right(query, episode.query_y))

    def meta_loss(self, weights, episode: Episode, steps, first_order=None, track_steps=True,
                  iteration=None):
        s_ce, q_ce, _, q_right = self._losses(weights, episode)
        loss = tf.reduce_mean(tf.concat([s_ce, q_ce], 1))
        return loss, StepMetrics(tf.reduce_mean(q_ce, 1)[:, None],
                                 tf.reduce_mean(q_right, 1)[:, None])

    def eval_metrics(self, weights, episode: Episode, steps: int) -> StepMetrics:
        s_ce, q_ce, s_right, q_right = self._losses(weights, episode)
        seen = instances_seen(episode.support_y, self.way)                   # [T, N_s]
        shot = episode.support_y.shape[1] // self.way

        def by_seen(support, query):
            cols = [_masked_mean(support, tf.equal(seen, i)) for i in range(shot)]
            return tf.stack(cols + [tf.reduce_mean(query, 1)], 1)
        return StepMetrics(by_seen(s_ce, q_ce), by_seen(s_right, q_right))


def _masked_mean(values: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Row means ``[T]`` of values ``[T, N]`` over the positions where mask is true."""
    mask = tf.cast(mask, values.dtype)
    return tf.reduce_sum(values * mask, 1) / tf.maximum(tf.reduce_sum(mask, 1), 1.0)
