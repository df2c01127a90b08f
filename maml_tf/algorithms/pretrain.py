"""The pre-training baseline: one network trained on all training tasks, fine-tuned at test."""

from __future__ import annotations

import keras
import tensorflow as tf

from maml_tf.meta_learner import MetaLearner, StepMetrics
from maml_tf.models.functional import tile_for_tasks


class Pretrain(MetaLearner):
    """The pre-training baseline: one network trained on all training tasks jointly, then
    fine-tuned on each test task's support set by the inner loop.

    Classification: the body learns a softmax over all ``num_classes`` training classes
    (its own head ``[D, C]``, the ``extra`` weights) on the episodes' images and their
    split-level labels (``Episode.classes``). Fine-tuning starts from the body and a zero
    N-way head. Regression (sinusoid): the network regresses all tasks jointly, with no inner
    loop (``train_inner_steps`` is 0), as the paper's baseline.
    """

    SECOND_ORDER = False   # no outer tape through an inner loop

    def __init__(self, model, *, num_classes: int | None = None, **kwargs):
        super().__init__(model, **kwargs)
        self.body, self.head = self.net.split_head()
        self.num_classes = num_classes
        if num_classes:
            dim, dtype = self.head.variables[0].shape[0], self.head.variables[0].dtype
            self.extra = [tf.Variable(keras.initializers.GlorotUniform()((dim, num_classes), dtype),
                                      name="all_classes_kernel"),
                          tf.Variable(tf.zeros([num_classes], dtype), name="all_classes_bias")]

    def inner_loop(self, weights, x, y, steps, first_order=None):
        if self.num_classes:
            nh = len(self.head.variables)
            net_weights, extra = self.split(weights)
            weights = net_weights[:-nh] + [tf.zeros_like(w) for w in net_weights[-nh:]] + extra
        return super().inner_loop(weights, x, y, steps, first_order)

    def meta_step(self, weights, episode, steps, iteration=None, first_order=None,
                  track_steps=True):
        if not self.num_classes:
            return super().meta_step(weights, episode, steps, iteration, first_order,
                                     track_steps)
        if episode.classes is None:
            raise ValueError("Pre-training on all classes needs Episode.classes (the split-level "
                             "class of each label); the data pipelines provide it.")
        with tf.GradientTape() as tape:
            tape.watch(weights)
            net_weights, (kernel, bias) = self.split(weights)
            nb = len(self.body.variables)
            x = tf.concat([episode.support_x, episode.query_x], axis=1)
            y = tf.gather(episode.classes, tf.concat([episode.support_y, episode.query_y], 1),
                          batch_dims=1)
            body = tile_for_tasks(net_weights[:nb], x.shape[0])
            logits = tf.matmul(self.apply_in_compute_dtype(self.body, body, x), kernel) + bias
            task_loss = self.loss_fn(logits, y)
            loss = tf.reduce_mean(task_loss)
        grads = tape.gradient(loss, weights, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return loss, grads, StepMetrics(task_loss[:, None], self.metric_fn(logits, y)[:, None])
