"""Reptile (Nichol et al. 2018): a pseudo-gradient towards the adapted weights, no outer tape."""

from __future__ import annotations

import tensorflow as tf

from maml_tf.meta_learner import MetaLearner


class Reptile(MetaLearner):
    """Reptile (Nichol et al. 2018, batched version).

    Each task takes ``steps`` inner steps on its support set with the inner optimizer
    (``inner_optimizer="adam"`` is the paper's Adam with beta1 = 0). The outer optimizer then
    receives the pseudo-gradient ``theta - mean_t(phi_t)``; plain SGD at rate epsilon gives
    the paper's update ``theta += epsilon * mean_t(phi_t - theta)``, and a linear schedule
    anneals epsilon to 0. No outer tape, no query set in the update: query metrics are
    computed for logging only.
    """

    SECOND_ORDER = False   # no outer tape through the inner loop

    def __init__(self, model, **kwargs):
        super().__init__(model, **{**kwargs, "first_order": True})

    def meta_step(self, weights, episode, steps, iteration=None, first_order=None,
                  track_steps=True):
        trajectory = self.inner_loop(weights, episode.support_x, episode.support_y, steps,
                                     first_order=True)
        net_weights, extra = self.split(weights)
        grads = [w - tf.cast(tf.reduce_mean(phi, axis=0), w.dtype)
                 for w, phi in zip(net_weights, trajectory[-1])]
        per_step = self.score(trajectory, episode, extra, track_steps)
        loss = tf.reduce_mean(per_step.loss[:, -1])   # for logging: no gradient is taken
        return loss, grads + [tf.zeros_like(e) for e in extra], per_step
