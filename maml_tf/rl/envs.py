"""The reinforcement-learning task distributions that ``--dataset`` names.

``spec(name)`` gives their sizes without building anything (``rl.family`` sizes the policy by them);
``make_env(name)`` builds one. HalfCheetah needs the optional extra ``rl`` (gymnasium with
MuJoCo); without it, asking for it says what to install and nothing else changes.
"""

from __future__ import annotations

import dataclasses

from maml_tf.config import ConfigError


@dataclasses.dataclass(frozen=True)
class EnvSpec:
    observation_dim: int
    action_dim: int
    task_dim: int
    horizon: int


SPECS = {
    "navigation_2d": EnvSpec(observation_dim=2, action_dim=2, task_dim=2, horizon=100),
    "halfcheetah_vel": EnvSpec(observation_dim=17, action_dim=6, task_dim=1, horizon=200),
    "halfcheetah_dir": EnvSpec(observation_dim=17, action_dim=6, task_dim=1, horizon=200),
}


def spec(name: str) -> EnvSpec:
    return SPECS[name]


def make_env(name: str):
    """The environment of ``--dataset=name``."""
    if name == "navigation_2d":
        from maml_tf.data.navigation import Navigation2D
        return Navigation2D()
    try:
        from maml_tf.data import halfcheetah
    except ImportError as e:
        raise ConfigError(f"--dataset={name} runs HalfCheetah in MuJoCo through gymnasium, which "
                          f"is not installed ({e}). Install the optional extra: "
                          "pip install -e \".[rl]\" (or pip install \"gymnasium[mujoco]\").") from None
    return halfcheetah.HalfCheetah(goal=name.rsplit("_", 1)[1])
