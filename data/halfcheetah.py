"""HalfCheetah goal velocity and goal direction (Finn et al. 2017, section 5.3), in MuJoCo.

Needs the optional extra ``rl`` (``pip install -e ".[rl]"``: gymnasium with MuJoCo); this
module imports ``mujoco`` and ``gymnasium`` and fails with ImportError without them.

The robot is gymnasium's ``half_cheetah.xml`` (its HalfCheetah-v5 model, frame skip 5, so
one step is 0.05 s). The T x N copies of a meta-batch are one array of MuJoCo physics states,
advanced together by ``mujoco.rollout`` (C++, one thread per core; the same states as
``mj_step`` copy by copy, measured 1.4 times faster here). Rewards as cbfinn/maml_rl's
``half_cheetah_env_rand*.py``:

* goal velocity (task: target speed uniform in [0, 2]): ``-|v_x - goal| - 0.05 |a|^2``;
* goal direction (task: +1 forward or -1 backward, equally likely): ``goal * v_x - 0.05 |a|^2``;

with ``v_x`` the torso's forward speed over the step and actions clipped to [-1, 1] (the
control range, onto which maml_rl's ``normalize`` mapped the policy's actions). Observations
are gymnasium's 17 numbers (joint positions without the x coordinate, then velocities;
maml_rl's rllab model also appended the torso's centre of mass, 20 in all). Episodes last
200 steps; start states are jittered as gymnasium's (uniform 0.1 on positions, normal 0.1 on
velocities), seeded per trajectory.
"""

from __future__ import annotations

import os

import gymnasium
import mujoco
import numpy as np
import tensorflow as tf
from mujoco import rollout

HORIZON = 200
FRAME_SKIP = 5
CONTROL_COST = 0.05     # maml_rl: 0.5 * 1e-1 * sum(a^2)
RESET_NOISE = 0.1


class HalfCheetah:
    """A distribution of HalfCheetah tasks (``goal``: ``"vel"`` or ``"dir"``)."""

    observation_dim = 17
    action_dim = 6
    task_dim = 1
    horizon = HORIZON
    in_graph = False   # stepped in NumPy (rl.rollout.rollout_python)

    def __init__(self, goal: str):
        if goal not in ("vel", "dir"):
            raise ValueError(f"goal must be 'vel' or 'dir', got {goal!r}.")
        self.goal = goal
        self.name = f"halfcheetah_{goal}"
        xml = os.path.join(os.path.dirname(gymnasium.__file__), "envs", "mujoco", "assets",
                           "half_cheetah.xml")
        self.model = mujoco.MjModel.from_xml_path(xml)
        self.dt = self.model.opt.timestep * FRAME_SKIP
        # A physics state is [time, qpos, qvel] for this model (no actuator activations).
        self.spec = mujoco.mjtState.mjSTATE_FULLPHYSICS
        size = mujoco.mj_stateSize(self.model, self.spec)
        if size != 1 + self.model.nq + self.model.nv:
            raise RuntimeError(f"Unexpected MuJoCo state size {size} for half_cheetah.xml.")
        self._threads = [mujoco.MjData(self.model) for _ in range(os.cpu_count() or 1)]

    def sample_tasks(self, seed: tf.Tensor, num_tasks: int) -> tf.Tensor:
        """Tasks ``[T, 1]``: a target velocity in [0, 2], or a direction in {-1, +1}."""
        u = tf.random.stateless_uniform([num_tasks, 1], seed)
        return 2.0 * u if self.goal == "vel" else tf.where(u < 0.5, -1.0, 1.0)

    def _qpos(self, state: np.ndarray) -> np.ndarray:
        return state[:, 1:1 + self.model.nq]

    def reset(self, tasks: np.ndarray, num_trajectories: int, seed: np.ndarray):
        """Start states ``[T * N, nstate]``, jittered with ``seed``."""
        t, n = tasks.shape[0], num_trajectories
        rng = np.random.default_rng([int(s) % 2 ** 63 for s in np.asarray(seed).ravel()])
        nq, nv = self.model.nq, self.model.nv
        state = np.zeros([t * n, 1 + nq + nv])
        state[:, 1:1 + nq] = self.model.qpos0 + rng.uniform(-RESET_NOISE, RESET_NOISE, [t * n, nq])
        state[:, 1 + nq:] = RESET_NOISE * rng.standard_normal([t * n, nv])
        return state, t, n

    def observe(self, state) -> np.ndarray:
        """Observations ``[T, N, 17]``: joint positions without x, then velocities."""
        physics, t, n = state
        return physics[:, 2:].reshape(t, n, -1).astype(np.float32)

    def step(self, state, action: np.ndarray, tasks: np.ndarray):
        """(state, reward ``[T, N]``, done ``[T, N]``: never before the horizon)."""
        physics, t, n = state
        action = np.clip(action.reshape(t * n, -1), -1.0, 1.0).astype(np.float64)
        control = np.repeat(action[:, None, :], FRAME_SKIP, axis=1)
        out, _ = rollout.rollout(self.model, self._threads, physics, control,
                                 control_spec=mujoco.mjtState.mjSTATE_CTRL)
        new = out[:, -1]
        speed = ((self._qpos(new)[:, 0] - self._qpos(physics)[:, 0]) / self.dt).reshape(t, n)
        goal = np.asarray(tasks, np.float64).reshape(t, 1)
        forward = -np.abs(speed - goal) if self.goal == "vel" else goal * speed
        reward = forward - CONTROL_COST * np.sum(np.square(action), -1).reshape(t, n)
        return (new, t, n), reward, np.zeros([t, n], bool)
