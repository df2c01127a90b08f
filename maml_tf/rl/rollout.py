"""Sampling trajectories of T tasks x N trajectories with a (task-batched) Gaussian policy.

``rollout_in_graph`` runs an environment written in TensorFlow (``data.navigation``): the
whole horizon is one ``tf.while_loop``, so a rollout is a single compiled call with no Python
per time step. ``rollout_python`` drives an environment stepped in Python (MuJoCo through
``data.halfcheetah``), calling the compiled policy once per time step for all T x N copies.
Both return ``Trajectories`` with the same shapes and the same meaning of ``mask``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import tensorflow as tf

from maml_tf.rl.policy import split_output


class Trajectories(NamedTuple):
    """N trajectories of horizon H for each of T tasks (a named tuple: it passes through
    ``tf.function`` and ``tf.nest`` as is).

    obs ``[T, N, H, O]`` (what the policy saw, the goal appended for an oracle); actions
    ``[T, N, H, A]`` (as sampled, before the environment clips them); rewards ``[T, N, H]``;
    mask ``[T, N, H]``: 1 for the steps taken before the episode ended (the step that reaches
    the goal included), 0 after. Returns are sums of ``rewards * mask`` over H.
    """
    obs: tf.Tensor
    actions: tf.Tensor
    rewards: tf.Tensor
    mask: tf.Tensor

    def returns(self) -> tf.Tensor:
        """Undiscounted return of each trajectory ``[T, N]``."""
        return tf.reduce_sum(self.rewards * self.mask, -1)

    def flat(self) -> tuple[tf.Tensor, tf.Tensor]:
        """(obs ``[T, N*H, O]``, actions ``[T, N*H, A]``): the inner loop's inputs."""
        t = tf.shape(self.obs)[0]
        return (tf.reshape(self.obs, [t, -1, self.obs.shape[-1]]),
                tf.reshape(self.actions, [t, -1, self.actions.shape[-1]]))


def with_goal(obs: tf.Tensor, tasks: tf.Tensor) -> tf.Tensor:
    """An oracle's observation: ``obs`` ``[T, N, O]`` with the task ``[T, D]`` appended."""
    goal = tf.broadcast_to(tf.cast(tasks, obs.dtype)[:, None, :],
                           tf.concat([tf.shape(obs)[:2], tf.shape(tasks)[1:]], 0))
    return tf.concat([obs, goal], -1)


def sample_actions(out: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Actions ``[T, N, A]`` drawn from policy outputs ``[T, N, 2A]`` with a stateless seed."""
    mean, log_std = split_output(out)
    return mean + tf.exp(log_std) * tf.random.stateless_normal(tf.shape(mean), seed, dtype=mean.dtype)


def rollout_in_graph(env, policy: Callable[[tf.Tensor], tf.Tensor], tasks: tf.Tensor,
                     num_trajectories: int, seed: tf.Tensor, oracle: bool = False,
                     horizon: int | None = None) -> Trajectories:
    """Rolls ``num_trajectories`` episodes per task of a TensorFlow environment.

    policy: observations ``[T, N, O]`` -> outputs ``[T, N, 2A]``; tasks ``[T, D]``; seed: a
    stateless seed ``[2]``; the noise of step t is drawn with ``fold_in(seed, t)``.
    """
    horizon = horizon or env.horizon
    num_tasks = tasks.shape[0]
    state = env.reset(tasks, num_trajectories, seed)
    alive = tf.ones([num_tasks, num_trajectories], tf.bool)
    arrays = [tf.TensorArray(tf.float32, horizon) for _ in range(4)]

    def body(t, state, alive, arrays):
        obs = env.observe(state)
        if oracle:
            obs = with_goal(obs, tasks)
        action = sample_actions(policy(obs), tf.random.experimental.stateless_fold_in(seed, t))
        new_state, reward, done = env.step(state, action, tasks)
        mask = tf.cast(alive, tf.float32)
        arrays = [a.write(t, v) for a, v in zip(arrays, (obs, action, reward * mask, mask))]
        # A finished episode stays where it ended; its later steps are masked out.
        keep = alive[..., None]
        state = tf.where(keep, new_state, state)
        return t + 1, state, alive & ~done, arrays

    _, _, _, arrays = tf.while_loop(lambda t, *_: t < horizon, body,
                                    (tf.constant(0), state, alive, arrays))
    # TensorArrays stack time first: [H, T, N, ...] -> [T, N, H, ...].
    obs, actions, rewards, mask = (a.stack() for a in arrays)
    return Trajectories(tf.transpose(obs, [1, 2, 0, 3]), tf.transpose(actions, [1, 2, 0, 3]),
                        tf.transpose(rewards, [1, 2, 0]), tf.transpose(mask, [1, 2, 0]))


def rollout_python(env, policy: Callable[[tf.Tensor], tf.Tensor], tasks: tf.Tensor,
                   num_trajectories: int, seed: tf.Tensor, oracle: bool = False,
                   horizon: int | None = None) -> Trajectories:
    """As ``rollout_in_graph``, for an environment stepped in NumPy (``env.reset`` /
    ``env.step`` take and return arrays); ``policy`` is called once per time step."""
    horizon = horizon or env.horizon
    tasks_np = np.asarray(tasks, np.float32)
    state = env.reset(tasks_np, num_trajectories, np.asarray(seed))
    alive = np.ones([tasks_np.shape[0], num_trajectories], bool)
    obs_l, act_l, rew_l, mask_l = [], [], [], []
    for t in range(horizon):
        obs = tf.constant(env.observe(state), tf.float32)
        if oracle:
            obs = with_goal(obs, tf.constant(tasks_np))
        action = sample_actions(policy(obs), tf.random.experimental.stateless_fold_in(seed, t))
        state, reward, done = env.step(state, action.numpy(), tasks_np)
        mask = alive.astype(np.float32)
        obs_l.append(obs.numpy())
        act_l.append(action.numpy())
        rew_l.append(reward.astype(np.float32) * mask)
        mask_l.append(mask)
        alive = alive & ~done
    return Trajectories(*(tf.constant(np.stack(v, axis=2)) for v in (obs_l, act_l, rew_l, mask_l)))
