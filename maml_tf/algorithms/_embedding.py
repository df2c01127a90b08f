"""The shared core of the learners that classify queries from support embeddings with no
inner loop (ProtoNets, R2-D2, MetaOptNet, Matching and Relation Networks, and the black-box
SNAIL): the network's body embeds both sets, and a head that reads the support set scores
the queries."""

from __future__ import annotations

import tensorflow as tf

from maml_tf.data.episode import Episode
from maml_tf.meta_learner import MetaLearner, StepMetrics
from maml_tf.models.functional import tile_for_tasks, with_support_statistics


class EmbeddingLearner(MetaLearner):
    """Base class: the body of the network (everything before its head, whose weights stay
    unused) embeds support and query examples; ``head`` maps (support embeddings, support
    labels, query embeddings, the learner's own tensors) to query logits ``[T, N_q, way]``.
    There is no inner loop, so ``StepMetrics`` has a single column and ``inner_steps`` is
    ignored.

    Subclasses implement ``head`` and may override ``query_loss`` (Relation Networks use
    the MSE to one-hot targets) and ``embed`` (feature maps instead of vectors).
    """

    SECOND_ORDER = False   # no inner loop: first derivatives only
    metric_axis: str | None = None

    def __init__(self, model, *, way: int | None = None, **kwargs):
        super().__init__(model, **kwargs)
        self.body, head = self.net.split_head()
        # The head (unused) was built for the task's classes: its outputs are the way.
        self.way = int(way or head.variables[-1].shape[-1])

    def vector_head_kernel(self) -> tf.Variable:
        """The (unused) head's kernel ``[D, way]``, for learners that read D-dimensional body
        embeddings (SNAIL, MANN); a body that does not output vectors is refused."""
        kernel = self.net.split_head()[1].variables[0]
        if kernel.shape.rank != 2:
            raise ValueError(f"{type(self).__name__} needs a body that outputs vectors (a Dense "
                             f"head); the head's kernel has shape {kernel.shape}.")
        return kernel

    def inner_loop(self, weights, x, y, steps, first_order=None):
        raise NotImplementedError(f"{type(self).__name__} has no inner loop: use "
                                  "meta_gradient, evaluate or meta_loss.")

    def embed(self, weights, x: tf.Tensor) -> tf.Tensor:
        """Embeddings ``[T, N, ...]`` of x ``[T, N, ...]`` by the body at ``weights``."""
        nb = len(self.body.variables)
        body = tile_for_tasks(weights[:nb], x.shape[0])
        return self.apply_in_compute_dtype(self.body, body, x)

    def embed_episode(self, weights, episode: Episode) -> tuple[tf.Tensor, tf.Tensor]:
        """(support embeddings, query embeddings). In the ``support`` evaluation mode the
        queries are normalised with the statistics of the task's support set, so that no
        query's embedding depends on the other queries."""
        mode = self._eval_mode
        if mode is None or mode.mode != "support":
            return self.embed(weights, episode.support_x), self.embed(weights, episode.query_x)
        return with_support_statistics(lambda: self.embed(weights, episode.support_x),
                                       lambda: self.embed(weights, episode.query_x))

    @property
    def normalises_queries_with_support(self) -> bool:
        return True

    def head(self, support: tf.Tensor, support_y: tf.Tensor, query: tf.Tensor,
             extra: list[tf.Tensor]) -> tf.Tensor:
        """Query logits ``[T, N_q, way]`` from support embeddings ``[T, N_s, ...]``, their
        labels ``[T, N_s]`` and query embeddings ``[T, N_q, ...]``."""
        raise NotImplementedError

    def query_loss(self, logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        """Per-task loss ``[T]`` (the learner's ``loss``, cross-entropy by default)."""
        return self.loss_fn(logits, labels)

    def meta_loss(self, weights, episode: Episode, steps, first_order=None, track_steps=True,
                  iteration=None):
        logits = self.logits(weights, episode)
        loss = self.query_loss(logits, episode.query_y)
        metric = self.metric_fn(logits, episode.query_y) if self.metric_fn else None
        per_step = StepMetrics(loss[:, None], None if metric is None else metric[:, None])
        return tf.reduce_mean(loss), per_step

    def query_predictions(self, weights, episode: Episode, steps: int) -> tf.Tensor:
        return self.logits(weights, episode)

    def logits(self, weights, episode: Episode) -> tf.Tensor:
        """Query logits ``[T, N_q, way]`` of an episode at ``weights``."""
        zs, zq = self.embed_episode(weights, episode)
        return self.head(zs, episode.support_y, zq, self.split(weights)[1])

    def metrics_by_shots_seen(self, weights, episode: Episode) -> StepMetrics:
        """Query loss and metric ``[T, shot + 1]`` when the head reads only the first i support
        examples of each class (in the episode's order), i = 0..shot; the last column is the
        usual prediction. The black-box learners' ``eval_metrics`` (``metric_axis =
        "shots_seen"``); their ``head`` must accept any number of shots, none included."""
        zs, zq = self.embed_episode(weights, episode)
        extra = self.split(weights)[1]
        ns = zs.shape[1]
        seen = instances_seen(episode.support_y, self.way)                   # [T, N_s]
        losses, metrics = [], []
        # Positions sorted by (instance number, position): the first way * shots of them are
        # the first `shots` examples of every class, whatever the order (static shapes, for
        # XLA); sorted back into the episode's order.
        order = tf.argsort(seen * ns + tf.range(ns)[None], axis=1)
        metric_fn = self.metric_fn
        assert metric_fn is not None, "scores by shots seen are for classifiers"
        for shots in range(ns // self.way + 1):
            keep = tf.sort(order[:, :self.way * shots], axis=1)
            zs_k = tf.gather(zs, keep, axis=1, batch_dims=1)
            ys_k = tf.gather(episode.support_y, keep, axis=1, batch_dims=1)
            logits = self.head(zs_k, ys_k, zq, extra)
            losses.append(self.query_loss(logits, episode.query_y))
            metrics.append(metric_fn(logits, episode.query_y))
        return StepMetrics(tf.stack(losses, 1), tf.stack(metrics, 1))


def class_sums(z: tf.Tensor, labels: tf.Tensor, way: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-class sums ``[T, way, ...]`` of embeddings z ``[T, N, ...]`` and the class
    counts ``[T, way]``."""
    onehot = tf.one_hot(labels, way, dtype=z.dtype)                  # [T, N, way]
    flat = tf.reshape(z, [z.shape[0], z.shape[1], -1])
    sums = tf.matmul(onehot, flat, transpose_a=True)                # [T, way, D]
    return tf.reshape(sums, [z.shape[0], way] + z.shape[2:].as_list()), tf.reduce_sum(onehot, 1)


def instances_seen(labels: tf.Tensor, way: int) -> tf.Tensor:
    """For labels ``[T, N]``, how many earlier positions of each row have the same label."""
    onehot = tf.one_hot(labels, way, dtype=tf.int32)
    before = tf.cumsum(onehot, axis=1, exclusive=True)
    return tf.reduce_sum(before * onehot, -1)
