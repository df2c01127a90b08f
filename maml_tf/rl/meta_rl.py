"""MAML for reinforcement learning (Finn et al. 2017, section 5.3) on the shared core.

``MetaRL`` wraps any ``MetaLearner`` whose loss is ``policy.reinforce_loss`` (MAML, FOMAML,
Meta-SGD; the pre-training baseline takes no inner step) and an environment of
``data.navigation`` / ``data.halfcheetah``. It owns what reinforcement learning adds:

* sampling (``rollout``), and the inner loop's "support set": the trajectories of the current
  policy with GAE advantages from a per-task linear baseline (``support``);
* adaptation: the learner's own ``inner_loop`` (fast weights as tensors, the second-order
  path kept), one inner step of vanilla policy gradient in meta-training;
* the outer objective, TRPO's surrogate on the post-update trajectories and the KL between
  the post-update policies before and after the update, both differentiated through the
  inner step (``surrogate``, ``kl``, and the KL's exact Hessian-vector product);
* evaluation: the return after 0..S inner steps, each step sampling new trajectories with the
  adapted policy (``evaluate``).

Shapes: tasks ``[T, D]``; trajectories as ``rollout.Trajectories`` ``[T, N, H, ...]``; the
inner loop sees them flattened to ``[T, N*H, ...]``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from maml_tf.meta_learner import MetaLearner
from maml_tf.rl import policy as P
from maml_tf.rl import returns as R
from maml_tf.rl import trpo
from maml_tf.rl.rollout import Trajectories, rollout_in_graph, rollout_python


@dataclasses.dataclass(frozen=True)
class RLSettings:
    """The switches of policy-gradient MAML (the paper's values as defaults).

    trajectories: per task and policy in meta-training; discount, gae_lambda: GAE's gamma
    and lambda; train_inner_steps: inner steps in meta-training (0: the pre-trained baseline);
    max_kl: TRPO's KL limit; cg_iterations: conjugate-gradient iterations; oracle: the policy
    observes the task; horizon: steps per episode (None: the environment's).
    """
    trajectories: int = 20
    discount: float = 0.99
    gae_lambda: float = 1.0
    train_inner_steps: int = 1
    max_kl: float = 0.01
    cg_iterations: int = 10
    oracle: bool = False
    horizon: int | None = None


class Batch(NamedTuple):
    """The outer loop's data for one meta-batch. pre_x ``[T, M, O]`` and pre_y
    (``policy.pack``, ``[T, M, A + 2]``): the inner loop's support set; post_x, actions,
    advantages, mask ``[T, M, ...]``: the post-update trajectories; old: the post-update
    policy's outputs before the update ``[T, M, 2A]`` (constants of the surrogate and KL)."""
    pre_x: tf.Tensor
    pre_y: tf.Tensor
    post_x: tf.Tensor
    actions: tf.Tensor
    advantages: tf.Tensor
    mask: tf.Tensor
    old: tf.Tensor


class MetaRL:
    """Policy-gradient meta-learning with ``learner`` on the tasks of ``env`` (see the module
    docstring). ``jit_compile`` compiles adaptation, the surrogate and its derivatives with
    XLA; rollouts of a TensorFlow environment always run as one compiled graph."""

    def __init__(self, learner: MetaLearner, env, settings: RLSettings = RLSettings(),
                 jit_compile: bool = False):
        self.learner, self.env, self.settings = learner, env, settings
        self.horizon = settings.horizon or env.horizon
        self._in_graph = getattr(env, "in_graph", False)
        fn = lambda f: tf.function(f, jit_compile=jit_compile)  # noqa: E731
        self._rollout_graph = tf.function(self._rollout_graph_fn)
        self._policy_out = tf.function(self._policy_out_fn)
        self._support = tf.function(self.support)
        self._adapt = fn(self._adapt_fn)
        self._inner_step = fn(self._inner_step_fn)
        self._loss_and_grad = fn(self._loss_and_grad_fn)
        self._loss_and_kl = fn(self._loss_and_kl_fn)
        self._hvp = fn(self._hvp_fn)

    # -- policies and sampling ----------------------------------------------------------
    def initial_fast_weights(self, weights, num_tasks: int) -> list[tf.Tensor]:
        net, extra = self.learner.split(weights)
        return self.learner.initial_fast_weights(net, num_tasks, extra)

    # The RL learners run the same network at every inner step (no per-step weights as
    # MAML++'s), so policies are evaluated with step 0.
    def _rollout_graph_fn(self, fast, extra, tasks, seed, num_trajectories):
        policy = lambda obs: self.learner.forward_at(list(fast), obs, extra, 0)  # noqa: E731
        return rollout_in_graph(self.env, policy, tasks, num_trajectories, seed,
                                self.settings.oracle, self.horizon)

    def _policy_out_fn(self, fast, extra, obs):
        return self.learner.forward_at(list(fast), obs, extra, 0)

    def rollout(self, fast, extra, tasks, seed, num_trajectories: int) -> Trajectories:
        """Trajectories ``[T, N, H, ...]`` of the policies with fast weights ``fast``
        (``[T, *shape]`` each) on ``tasks`` ``[T, D]``."""
        if self._in_graph:
            return self._rollout_graph(list(fast), list(extra), tasks, seed, num_trajectories)
        policy = lambda obs: self._policy_out(list(fast), list(extra), obs)  # noqa: E731
        return rollout_python(self.env, policy, tasks, num_trajectories, seed,
                              self.settings.oracle, self.horizon)

    def support(self, trajectories: Trajectories) -> tuple[tf.Tensor, tf.Tensor]:
        """The inner loop's support set from trajectories: (obs ``[T, N*H, O]``, labels
        ``[T, N*H, A + 2]``: actions, normalised GAE advantages, validity)."""
        s = self.settings
        adv = R.advantages(trajectories.obs, trajectories.rewards, trajectories.mask,
                           s.discount, s.gae_lambda)
        x, actions = trajectories.flat()
        t = tf.shape(x)[0]
        return x, P.pack(actions, tf.reshape(adv, [t, -1]), tf.reshape(trajectories.mask, [t, -1]))

    # -- adaptation -------------------------------------------------------------------
    def _adapt_fn(self, weights, x, y):
        return self.learner.inner_loop(list(weights), x, y, self.settings.train_inner_steps)[-1]

    def _inner_step_fn(self, fast, extra, x, y, scale):
        grads, _ = self.learner.support_grads(list(fast), x, y, True, extra, 0)
        state = self.learner.init_inner_state(list(fast))
        new, _ = self.learner.inner_update(list(fast), grads, state, list(extra), 0)
        # Steps after the first may use a smaller step size (the paper: 0.1, then 0.05):
        # every supported inner update is linear in its step size, so it is scaled.
        return [p + scale * (n - p) for p, n in zip(fast, new)]

    # -- meta-training ----------------------------------------------------------------
    def collect(self, weights, tasks, seeds) -> tuple[Batch, dict]:
        """Samples one meta-batch: pre-update trajectories, the adapted policies, and their
        post-update trajectories. seeds ``[2, 2]``: the two rollouts' stateless seeds.
        Returns the outer loop's ``Batch`` and the mean returns before and after."""
        s = self.settings
        extra = self.learner.split(weights)[1]
        num_tasks = tasks.shape[0]
        fast0 = self.initial_fast_weights(weights, num_tasks)
        pre = self.rollout(fast0, extra, tasks, seeds[0], s.trajectories)
        pre_x, pre_y = self._support(pre)
        info = {"return/step_0": float(tf.reduce_mean(pre.returns()))}
        if s.train_inner_steps:
            fast = self._adapt(list(weights), pre_x, pre_y)
            post = self.rollout(fast, extra, tasks, seeds[1], s.trajectories)
            post_x, post_y = self._support(post)
            info[f"return/step_{s.train_inner_steps}"] = float(tf.reduce_mean(post.returns()))
        else:
            fast, post_x, post_y = fast0, pre_x, pre_y
        old = self._policy_out(list(fast), list(extra), post_x)
        actions, adv, mask = P.unpack(post_y)
        return Batch(pre_x, pre_y, post_x, actions, adv, mask, old), info

    def _post_outputs(self, weights, batch):
        pre_x, pre_y, post_x = batch.pre_x, batch.pre_y, batch.post_x
        steps = self.settings.train_inner_steps
        if steps:
            fast = self.learner.inner_loop(list(weights), pre_x, pre_y, steps)[-1]
        else:
            fast = self.initial_fast_weights(weights, pre_x.shape[0])
        return self.learner.forward_at(fast, post_x, self.learner.split(weights)[1], 0)

    def surrogate(self, weights, batch) -> tf.Tensor:
        """TRPO's loss: minus the mean over tasks of ``E[ratio * advantage]`` on the
        post-update trajectories, ratio = pi_new / pi_old of the post-update policies."""
        out = self._post_outputs(weights, batch)
        ratio = tf.exp(P.log_prob(out, batch.actions) - P.log_prob(batch.old, batch.actions))
        return -tf.reduce_mean(P.masked_mean(ratio * batch.advantages, batch.mask))

    def kl(self, weights, batch) -> tf.Tensor:
        """Mean KL(post-update policy before the update || after) over tasks and states."""
        divergence = P.kl(batch.old, self._post_outputs(weights, batch))
        return tf.reduce_mean(P.masked_mean(divergence, batch.mask))

    def _weights(self, flat):
        return trpo.unflatten(flat, self.learner.meta_weights())

    def _loss_and_grad_fn(self, flat, batch):
        with tf.GradientTape() as tape:
            tape.watch(flat)
            loss = self.surrogate(self._weights(flat), batch)
        return loss, tape.gradient(loss, flat)

    def _loss_and_kl_fn(self, flat, batch):
        weights = self._weights(flat)
        return self.surrogate(weights, batch), self.kl(weights, batch)

    def _hvp_fn(self, flat, batch, vector):
        """The KL's Hessian at the batch's policy (``flat`` = the weights that produced
        ``batch.old``) times ``vector``, through the inner step.

        There the KL and its gradient are zero, so its Hessian is exactly ``J^T G J``: J the
        Jacobian of the post-update policy outputs with respect to the meta-weights (through
        the inner step), G the Gaussian KL's curvature in those outputs (``exp(-2 log_std)``
        for the mean, 2 for the log-std, no cross terms), weighted as the KL's mean. One
        forward-mode product (J v) and one reverse-mode product (J^T ...) give it, about
        three times cheaper than a gradient of a gradient, and with no approximation
        (tested against float64 finite differences of the KL's gradient).
        """
        with tf.GradientTape() as tape:
            tape.watch(flat)
            with tf.autodiff.ForwardAccumulator(flat, tf.stop_gradient(vector)) as acc:
                out = self._post_outputs(self._weights(flat), batch)
            jv = tf.stop_gradient(acc.jvp(out))
        _, old_log_std = P.split_output(batch.old)
        curvature = tf.concat([tf.exp(-2.0 * old_log_std), 2.0 * tf.ones_like(old_log_std)], -1)
        # The KL is a mean over tasks of masked means over steps: each step's weight.
        count = tf.maximum(tf.reduce_sum(batch.mask, 1, keepdims=True), 1.0)
        weight = batch.mask / count / tf.cast(tf.shape(batch.mask)[0], batch.mask.dtype)
        return tape.gradient(out, flat, output_gradients=curvature * jv * weight[..., None])

    def trpo_update(self, batch) -> trpo.StepInfo:
        """One TRPO step of the meta-variables on ``batch`` (assigns them)."""
        variables = self.learner.meta_variables
        flat = trpo.flatten([tf.convert_to_tensor(v) for v in variables])
        new, info = trpo.trpo_step(
            flat, lambda p: self._loss_and_grad(p, batch), lambda p, v: self._hvp(p, batch, v),
            lambda p: self._loss_and_kl(p, batch), self.settings.max_kl,
            self.settings.cg_iterations)
        for v, value in zip(variables, trpo.unflatten(new, variables)):
            v.assign(value)
        return info

    def gradient(self, batch) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """(surrogate, its gradient aligned with ``meta_variables``) for a first-order
        optimizer (``--meta_optimizer=adam``)."""
        variables = self.learner.meta_variables
        flat = trpo.flatten([tf.convert_to_tensor(v) for v in variables])
        loss, grad = self._loss_and_grad(flat, batch)
        return loss, trpo.unflatten(grad, variables)

    # -- evaluation --------------------------------------------------------------------
    def evaluate(self, tasks, seed, steps: int, step_sizes, num_trajectories: int,
                 keep_trajectories: bool = False):
        """Average return per task ``[T, steps + 1]`` after 0..steps inner steps: step k
        samples ``num_trajectories`` with the policy adapted k times, and (k < steps) adapts
        on them with step size ``step_sizes[k]``. seed: a stateless seed ``[2]``.
        With ``keep_trajectories``, also the trajectories of every step."""
        weights = self.learner.meta_weights()
        extra = self.learner.split(weights)[1]
        fast = self.initial_fast_weights(weights, tasks.shape[0])
        lr0 = self.learner.inner_lr
        out, kept = [], []
        for k in range(steps + 1):
            tr = self.rollout(fast, extra, tasks, tf.random.experimental.stateless_fold_in(seed, k),
                              num_trajectories)
            out.append(tr.returns().numpy().mean(axis=1))
            if keep_trajectories:
                kept.append(tr)
            if k < steps:
                x, y = self._support(tr)
                scale = float(step_sizes[k]) / lr0 if lr0 else 0.0
                fast = self._inner_step(list(fast), list(extra), x, y, tf.constant(scale))
        returns = np.stack(out, axis=1)
        return (returns, kept) if keep_trajectories else returns
