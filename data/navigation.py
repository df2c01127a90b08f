"""2D navigation (Finn et al. 2017, appendix A.2), in TensorFlow, vectorised over tasks and
trajectories: a whole rollout is one ``tf.while_loop`` inside a compiled function.

A point agent starts at the origin; each task is a goal drawn uniformly in [-0.5, 0.5]^2.
The policy's action ``a`` (unbounded, as a Gaussian policy samples it) becomes the velocity
command ``clip(0.1 * a, -0.1, 0.1)``: cbfinn/maml_rl ran ``point_env_randgoal.py`` under
rllab's ``normalize`` wrapper, which maps [-1, 1] onto the action bounds [-0.1, 0.1] and
clips. The reward after each step is the **negative distance** to the goal (maml_rl's code;
the paper's text says squared distance, but the figures and the released results that this
project compares with were produced by the code). The episode ends when both coordinates are
within 0.01 of the goal (maml_rl's test), or after the horizon of 100 steps.

Shapes: tasks (goals) ``[T, 2]``; positions and observations ``[T, N, 2]`` for N
trajectories per task.
"""

from __future__ import annotations

import tensorflow as tf

HORIZON = 100
GOAL_RANGE = 0.5
ACTION_SCALE = 0.1
GOAL_TOLERANCE = 0.01


class Navigation2D:
    """The task distribution and dynamics (all methods are pure TensorFlow functions)."""

    name = "navigation_2d"
    observation_dim = 2
    action_dim = 2
    task_dim = 2
    horizon = HORIZON
    in_graph = True   # rollouts run inside tf.function (rl.rollout.rollout_in_graph)

    def sample_tasks(self, seed: tf.Tensor, num_tasks: int) -> tf.Tensor:
        """Goals ``[T, 2]`` uniform in [-0.5, 0.5]^2 from a stateless ``seed`` ``[2]``."""
        return tf.random.stateless_uniform([num_tasks, 2], seed, -GOAL_RANGE, GOAL_RANGE)

    def reset(self, tasks: tf.Tensor, num_trajectories: int, seed: tf.Tensor) -> tf.Tensor:
        """Start states ``[T, N, 2]``: the origin (the start is deterministic)."""
        return tf.zeros([tasks.shape[0], num_trajectories, 2])

    def observe(self, state: tf.Tensor) -> tf.Tensor:
        """The observation is the position."""
        return state

    def step(self, state: tf.Tensor, action: tf.Tensor, tasks: tf.Tensor):
        """(next state, reward ``[T, N]``, done ``[T, N]``) for actions ``[T, N, 2]``."""
        command = tf.clip_by_value(ACTION_SCALE * action, -ACTION_SCALE, ACTION_SCALE)
        position = state + command
        offset = position - tasks[:, None, :]
        reward = -tf.norm(offset, axis=-1)
        done = tf.reduce_all(tf.abs(offset) < GOAL_TOLERANCE, axis=-1)
        return position, reward, done
