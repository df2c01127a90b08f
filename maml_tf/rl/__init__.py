"""Reinforcement learning on the meta-learning core: Gaussian policies (``policy``),
vectorised rollouts (``rollout``), returns and GAE (``returns``), TRPO (``trpo``),
policy-gradient MAML (``meta_rl.MetaRL``) and its task family for the run harness (``family``).

From Python::

    from maml_tf.rl import MetaRL, RLSettings, policy
    from maml_tf.data.navigation import Navigation2D
    learner = maml_tf.MAML(policy.gaussian_mlp(2, 2), inner_lr=0.1,
                           loss=policy.reinforce_loss, metric=None)
    meta = MetaRL(learner, Navigation2D(), RLSettings(trajectories=20))
    batch, info = meta.collect(learner.meta_weights(), tasks, seeds)   # sample, adapt, sample
    meta.trpo_update(batch)                                              # the outer step
"""

from maml_tf.rl.meta_rl import Batch, MetaRL, RLSettings

__all__ = ["Batch", "MetaRL", "RLSettings"]
