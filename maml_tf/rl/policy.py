"""Gaussian policies as Keras models, and the policy-gradient losses the learners use.

A policy is any ``keras.Model`` mapping observations ``[N, obs_dim]`` to ``[N, 2 * act_dim]``:
the action mean, then the log standard deviation. The paper's policy (``gaussian_mlp``) is an
MLP of two hidden layers of 100 ReLU units and a learned, state-independent log-std (the
``GaussianHead`` layer appends it). Because the log-std is a weight of the model, the inner
loop adapts it with the rest (as maml_rl did).

The learners call these functions on task-batched outputs ``[T, M, 2A]``; per-task losses
are ``[T]``, so the inner loop's summed loss gives each task its own gradient.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from maml_tf.models import layers as L


class GaussianHead(L.TaskBatchedLayer):
    """Appends a learned, state-independent log standard deviation to the action mean.

    Shapes: mean ``[T, N, A]`` -> ``[T, N, 2A]`` (mean, then log-std).
    """

    def __init__(self, init_log_std: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.init_log_std = float(init_log_std)

    def build(self, input_shape):
        self.log_std = self.add_weight(name="log_std", shape=(int(input_shape[-1]),),
                                       initializer=keras.initializers.Constant(self.init_log_std))

    def batched_apply(self, params, x, training=True):
        # [mean, log_std] as two matmuls with constant 0/1 matrices rather than a concat: a
        # concat's gradient is a slice, whose third derivative under XLA is not registered
        # (TRPO's Hessian-vector product through the inner step needs it).
        a = x.shape[-1]
        eye, zeros = tf.eye(a, dtype=x.dtype), tf.zeros([a, a], x.dtype)
        log_std = tf.cast(params[0], x.dtype)[:, None, :]
        return (tf.matmul(x, tf.concat([eye, zeros], 1))
                + tf.matmul(log_std, tf.concat([zeros, eye], 1)))

    def get_config(self):
        return {**super().get_config(), "init_log_std": self.init_log_std}


def gaussian_mlp(observation_dim: int, action_dim: int, hidden=(100, 100),
                 dtype: str = "float32") -> keras.Sequential:
    """The paper's policy: ``[N, observation_dim]`` -> ``[N, 2 * action_dim]``."""
    stack: list = []
    for i, units in enumerate(hidden):
        stack += [L.Dense(units, dtype=dtype, name=f"dense{i}"), L.ReLU(dtype=dtype, name=f"relu{i}")]
    stack += [L.Dense(action_dim, dtype=dtype, name="mean"), GaussianHead(dtype=dtype, name="log_std")]
    return keras.Sequential([keras.Input((observation_dim,), dtype=dtype)] + stack,
                            name="gaussian_mlp")


def split_output(out: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``[..., 2A]`` -> (mean ``[..., A]``, log-std ``[..., A]``)."""
    a = out.shape[-1] // 2
    return out[..., :a], out[..., a:]


def log_prob(out: tf.Tensor, actions: tf.Tensor) -> tf.Tensor:
    """Log-density of ``actions`` ``[..., A]`` under the policy outputs ``[..., 2A]`` -> ``[...]``."""
    mean, log_std = split_output(out)
    z = (actions - mean) * tf.exp(-log_std)
    a = actions.shape[-1]
    return (-0.5 * tf.reduce_sum(tf.square(z), -1) - tf.reduce_sum(log_std, -1)
            - 0.5 * a * math.log(2 * math.pi))


def kl(old: tf.Tensor, new: tf.Tensor) -> tf.Tensor:
    """KL(old || new) of diagonal Gaussians given as policy outputs ``[..., 2A]`` -> ``[...]``."""
    m0, s0 = split_output(old)
    m1, s1 = split_output(new)
    return tf.reduce_sum(s1 - s0 + (tf.exp(2 * s0) + tf.square(m0 - m1)) / (2 * tf.exp(2 * s1))
                         - 0.5, -1)


def pack(actions: tf.Tensor, advantages: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """The inner loop's "labels" ``[T, M, A + 2]``: actions, advantage and validity of each
    time step (``M`` = trajectories x horizon, flattened)."""
    return tf.concat([actions, advantages[..., None], mask[..., None]], axis=-1)


def unpack(y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    return y[..., :-2], y[..., -2], y[..., -1]


def masked_mean(values: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Mean over the valid steps of each task: values, mask ``[T, M]`` -> ``[T]``."""
    return tf.reduce_sum(values * mask, 1) / tf.maximum(tf.reduce_sum(mask, 1), 1.0)


def reinforce_loss(y: tf.Tensor, out: tf.Tensor) -> tf.Tensor:
    """The inner loop's vanilla policy-gradient surrogate per task ``[T]``:
    ``-mean_t log pi(a_t | s_t) * A_t`` over valid steps (its gradient is REINFORCE's
    estimate with the advantages as weights). y from ``pack``, out ``[T, M, 2A]``: Keras'
    ``(y_true, y_pred)`` order, so it is passed to a learner as ``loss=reinforce_loss``."""
    actions, advantages, mask = unpack(y)
    return -masked_mean(log_prob(out, actions) * advantages, mask)
