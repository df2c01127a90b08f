"""Conditional Neural Processes (Garnelo et al. 2018): a black-box meta-learner that reads the
support set and predicts each query directly, with no inner optimisation. ``CNP`` regresses
(a Gaussian per query); ``CNPClassifier`` classifies images from class-wise mean codes."""

from __future__ import annotations

import math
from typing import Sequence

import tensorflow as tf

from maml_tf.algorithms._embedding import EmbeddingLearner, class_sums
from maml_tf.data.episode import Episode
from maml_tf.meta_learner import MetaLearner, StepMetrics
from maml_tf.models import zoo
from maml_tf.models.functional import FunctionalModel, tile_for_tasks


REPRESENTATION = 128


class CNP(MetaLearner):
    """Conditional Neural Process (Garnelo et al. 2018), for regression.

    The encoder maps every support pair ``(x_i, y_i)`` to ``r_i``; their mean ``r`` (invariant
    to the order of the support points) is the task's representation; the decoder maps
    ``(x, r)`` to a mean ``mu`` and a standard deviation ``sigma = 0.1 + 0.9 softplus(s)`` for
    every query ``x`` (the lower bound keeps the likelihood finite). Training minimises the
    Gaussian negative log-likelihood of the query targets. ``StepMetrics.loss`` is the MSE of
    ``mu`` (one column in training), the number that MAML's sinusoid table reports;
    ``eval_metrics`` reports it given the first 0..K support points (with none, ``r = 0``);
    ``log_likelihood`` gives the per-point log-likelihood.

    ``model`` is the decoder, ``[N, x_dim + representation] -> [N, 2 y_dim]``; the encoder, an
    MLP ``[N, x_dim + y_dim] -> [N, representation]`` with ``encoder_hidden`` ReLU layers, is
    built here and its weights are the learner's ``extra`` tensors.
    """

    SECOND_ORDER = False   # no inner loop
    metric_axis = "shots_seen"

    def __init__(self, model, *, representation: int = REPRESENTATION,
                 encoder_hidden: Sequence[int] = (128, 128), **kwargs):
        super().__init__(model, **kwargs)
        self.representation = int(representation)
        inputs = int(self.net.model.input_shape[-1])
        outputs = int(self.net.model.output_shape[-1])
        if inputs <= self.representation or outputs % 2:
            raise ValueError(
                f"The CNP decoder must map [x, r] (x_dim + {self.representation} features) to a "
                f"mean and a scale per target dimension (2 y_dim outputs); this model maps "
                f"{inputs} to {outputs}.")
        self.x_dim, self.y_dim = inputs - self.representation, outputs // 2
        dtype = str(tf.as_dtype(self.net.variables[0].dtype).name)
        self.encoder = FunctionalModel(
            zoo.mlp(self.x_dim + self.y_dim, list(encoder_hidden), self.representation,
                    dtype=dtype), strict=False)
        self.extra = list(self.encoder.variables)

    def inner_loop(self, weights, x, y, steps, first_order=None):
        raise NotImplementedError("A CNP has no inner loop: use meta_gradient, evaluate, "
                                  "meta_loss or predict_distribution.")

    def predict_distribution(self, weights, support_x, support_y, query_x):
        """(mu, sigma), each ``[T, N_q, y_dim]``, for queries ``[T, N_q, x_dim]`` given the
        support set ``[T, N_s, x_dim]``, ``[T, N_s, y_dim]``."""
        if support_x.shape[1]:
            r = tf.reduce_mean(self.codes(weights, support_x, support_y), axis=1)   # [T, R]
        else:   # no context: the representation of an empty set is taken as zero
            r = tf.zeros([support_x.shape[0], self.representation], query_x.dtype)
        return self.decode(weights, r, query_x)

    def query_predictions(self, weights, episode, steps):
        """The predicted mean ``[T, N_q, y_dim]`` (``predict_distribution`` gives the scale)."""
        return self.predict_distribution(weights, episode.support_x, episode.support_y,
                                         episode.query_x)[0]

    def codes(self, weights, support_x, support_y) -> tf.Tensor:
        """The encoder's code ``[T, N_s, R]`` of every support pair."""
        encoder = tile_for_tasks(self.split(weights)[1][:len(self.encoder.variables)],
                                 support_x.shape[0])
        pairs = tf.concat([support_x, tf.cast(support_y, support_x.dtype)], axis=-1)
        return self.encoder.apply(encoder, pairs)

    def decode(self, weights, r, query_x):
        """(mu, sigma) ``[T, N_q, y_dim]`` for queries ``[T, N_q, x_dim]`` given the task
        representations r ``[T, R]``."""
        t = query_x.shape[0]
        r = tf.broadcast_to(r[:, None, :], [t, query_x.shape[1], self.representation])
        net = tile_for_tasks(self.split(weights)[0], t)
        out = self.net.apply(net, tf.concat([query_x, r], axis=-1))
        mu, scale = out[..., :self.y_dim], out[..., self.y_dim:]
        return mu, 0.1 + 0.9 * tf.nn.softplus(scale)

    def log_likelihood(self, weights, episode: Episode) -> tf.Tensor:
        """Mean Gaussian log-likelihood of each task's query targets, ``[T]``."""
        mu, sigma = self.predict_distribution(weights, episode.support_x, episode.support_y,
                                              episode.query_x)
        return tf.reduce_mean(gaussian_log_prob(episode.query_y, mu, sigma), axis=[1, 2])

    def meta_loss(self, weights, episode, steps, first_order=None, track_steps=True,
                  iteration=None):
        mu, sigma = self.predict_distribution(weights, episode.support_x, episode.support_y,
                                              episode.query_x)
        nll = -tf.reduce_mean(gaussian_log_prob(episode.query_y, mu, sigma), axis=[1, 2])
        mse = tf.reduce_mean(tf.square(mu - tf.cast(episode.query_y, mu.dtype)), axis=[1, 2])
        return tf.reduce_mean(nll), StepMetrics(mse[:, None], None)

    def eval_metrics(self, weights, episode, steps):
        """The query MSE given the first 0..K support points, ``[T, K + 1]``: the support is
        encoded once, and the representation after k points is the running mean of the codes
        (zero for k = 0)."""
        codes = self.codes(weights, episode.support_x, episode.support_y)     # [T, K, R]
        k = tf.range(1, codes.shape[1] + 1, dtype=codes.dtype)[None, :, None]
        means = tf.concat([tf.zeros_like(codes[:, :1]), tf.cumsum(codes, axis=1) / k], 1)
        columns = []
        for r in tf.unstack(means, axis=1):
            mu, _ = self.decode(weights, r, episode.query_x)
            columns.append(tf.reduce_mean(
                tf.square(mu - tf.cast(episode.query_y, mu.dtype)), axis=[1, 2]))
        return StepMetrics(tf.stack(columns, 1), None)


class CNPClassifier(EmbeddingLearner):
    """Conditional Neural Process as a few-shot image classifier (Garnelo et al. 2018, their
    Omniglot experiment: the aggregation is class-wise).

    The network's body (Conv-4 without its head, as the other learners) embeds every image to
    ``z`` ``[D]``; the encoder MLP maps each support embedding to a code ``[R]``; class c's
    representation ``r_c`` is the mean of its support codes (zero for a class with no support
    example yet, as the regression CNP's empty context), so it does not depend on the order of
    the support set. The decoder MLP scores every (query, class) pair, ``[z_q, r_c] -> logit``;
    one decoder is shared by the classes, so relabelling the classes permutes the logits and
    nothing else. Trained by cross-entropy on the queries. The encoder
    (``encoder_hidden`` ReLU layers, then R) and decoder (``decoder_hidden`` ReLU layers, then
    1) weights are the learner's ``extra`` tensors.

    Evaluation (``eval_metrics``) reports the query metrics by shots seen: column i reads the
    first i support examples of each class, i = 0..shot (at 0 every class is ``r = 0`` and the
    logits tie: argmax takes the first class, 1/way of balanced queries); the last column is
    the usual prediction. Any shot count works at test time.
    """

    metric_axis = "shots_seen"

    def __init__(self, model, *, representation: int = REPRESENTATION,
                 encoder_hidden: Sequence[int] = (128, 128),
                 decoder_hidden: Sequence[int] = (128, 128), **kwargs):
        super().__init__(model, **kwargs)
        kernel = self.vector_head_kernel()
        dim, self.dtype = int(kernel.shape[0]), tf.as_dtype(kernel.dtype)
        dtype = self.dtype.name
        self.representation = int(representation)
        self.encoder = FunctionalModel(
            zoo.mlp(dim, list(encoder_hidden), self.representation, dtype=dtype), strict=False)
        self.decoder = FunctionalModel(
            zoo.mlp(dim + self.representation, list(decoder_hidden), 1, dtype=dtype),
            strict=False)
        self.extra = list(self.encoder.variables) + list(self.decoder.variables)

    def class_representations(self, support, support_y, extra) -> tf.Tensor:
        """``r_c`` ``[T, way, R]``: the mean code of each class's support embeddings
        ``[T, N_s, D]`` (zero for a class with none)."""
        encoder = tile_for_tasks(extra[:len(self.encoder.variables)], support.shape[0])
        codes = self.apply_in_compute_dtype(self.encoder, encoder, support)   # [T, N_s, R]
        sums, counts = class_sums(codes, support_y, self.way)
        return sums / tf.maximum(counts, 1.0)[..., None]

    def head(self, support, support_y, query, extra):
        t, nq = query.shape[0], query.shape[1]
        decoder = tile_for_tasks(extra[len(self.encoder.variables):len(self.extra)], t)
        if not support.shape[1]:
            # No support example: every class is the empty set (r = 0), so one score per
            # query serves all classes. Computed once, the logits tie exactly (rows of one
            # batched matmul can round differently, and argmax would then favour a position).
            score = self.apply_in_compute_dtype(self.decoder, decoder, tf.concat(
                [query, tf.zeros([t, nq, self.representation], query.dtype)], -1))
            return tf.broadcast_to(score, [t, nq, self.way])
        r = self.class_representations(support, support_y, extra)             # [T, way, R]
        pairs = tf.concat(
            [tf.broadcast_to(query[:, :, None], [t, nq, self.way, query.shape[-1]]),
             tf.broadcast_to(r[:, None], [t, nq, self.way, self.representation])], -1)
        logits = self.apply_in_compute_dtype(
            self.decoder, decoder, tf.reshape(pairs, [t, nq * self.way, pairs.shape[-1]]))
        return tf.reshape(logits, [t, nq, self.way])

    def eval_metrics(self, weights, episode, steps):
        return self.metrics_by_shots_seen(weights, episode)


def gaussian_log_prob(y, mu, sigma):
    """``log N(y; mu, sigma^2)`` elementwise."""
    y = tf.cast(y, mu.dtype)
    return (-0.5 * math.log(2 * math.pi) - tf.math.log(sigma)
            - 0.5 * tf.square((y - mu) / sigma))
