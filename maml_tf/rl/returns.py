"""Returns, the linear feature baseline and GAE, for batches of trajectories of T tasks.

Shapes: rewards and masks ``[T, N, H]`` (N trajectories of horizon H per task; ``mask`` is 1
for the steps taken before the episode ended); observations ``[T, N, H, O]``. Everything is
a pure TensorFlow function (no Python per task or step), so it runs inside the compiled
meta-step.
"""

from __future__ import annotations

import tensorflow as tf

# rllab's LinearFeatureBaseline: ridge coefficient, and its time feature's scale.
BASELINE_RIDGE = 1e-5
TIME_SCALE = 100.0


def discounted_cumsum(x: tf.Tensor, discount: float) -> tf.Tensor:
    """``y_t = sum_{k >= t} discount^(k - t) x_k`` along the last axis ``H`` (one matmul
    with the upper-triangular matrix of discount powers: exact, and fast for H of hundreds)."""
    h = x.shape[-1]
    t = tf.range(h, dtype=tf.float64)
    power = t[:, None] - t[None, :]            # [k, t]: k - t
    weights = tf.where(power >= 0, tf.pow(tf.constant(discount, tf.float64), tf.maximum(power, 0)),
                       tf.zeros_like(power))
    return tf.einsum("...k,kt->...t", x, tf.cast(weights, x.dtype))


def baseline_features(obs: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """rllab's features ``[T, N, H, 2O + 4]``: clipped observation, its square, t/100 and its
    square and cube, and 1; zero at invalid steps."""
    h = obs.shape[2]
    o = tf.clip_by_value(obs, -10.0, 10.0)
    al = tf.broadcast_to((tf.range(h, dtype=obs.dtype) / TIME_SCALE)[None, None, :, None],
                         tf.concat([tf.shape(obs)[:3], [1]], 0))
    feats = tf.concat([o, tf.square(o), al, al ** 2, al ** 3, tf.ones_like(al)], -1)
    return feats * mask[..., None]


def fit_baseline(obs: tf.Tensor, returns: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Least-squares fit of each task's returns on its own features (ridge 1e-5, solved in
    float64 because the cubic time features are badly conditioned) -> baseline values
    ``[T, N, H]`` (zero at invalid steps)."""
    feats = baseline_features(obs, mask)
    t, f = tf.shape(feats)[0], feats.shape[-1]
    x = tf.cast(tf.reshape(feats, [t, -1, f]), tf.float64)
    y = tf.cast(tf.reshape(returns * mask, [t, -1, 1]), tf.float64)
    gram = tf.matmul(x, x, transpose_a=True) + BASELINE_RIDGE * tf.eye(f, dtype=tf.float64)
    coef = tf.linalg.solve(gram, tf.matmul(x, y, transpose_a=True))      # [T, F, 1]
    return tf.cast(tf.einsum("tnhf,tf->tnh", tf.cast(feats, tf.float64), coef[..., 0]),
                   returns.dtype)


def gae(rewards: tf.Tensor, values: tf.Tensor, mask: tf.Tensor, discount: float,
        lam: float) -> tf.Tensor:
    """Generalised advantage estimates ``[T, N, H]``: ``delta_t = r_t + discount * V_{t+1}
    - V_t`` (``V`` is 0 after the episode's last step), discounted by ``discount * lam``."""
    next_values = tf.concat([values[..., 1:] * mask[..., 1:], tf.zeros_like(values[..., :1])], -1)
    deltas = (rewards + discount * next_values - values) * mask
    return discounted_cumsum(deltas, discount * lam) * mask


def normalize(advantages: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Each task's advantages centred and scaled to unit variance over its valid steps
    (rllab's ``center_adv``, which maml_rl used for the inner and the outer loop)."""
    axes = [1, 2]
    count = tf.maximum(tf.reduce_sum(mask, axes, keepdims=True), 1.0)
    mean = tf.reduce_sum(advantages * mask, axes, keepdims=True) / count
    var = tf.reduce_sum(tf.square(advantages - mean) * mask, axes, keepdims=True) / count
    return (advantages - mean) / (tf.sqrt(var) + 1e-8) * mask


def advantages(obs: tf.Tensor, rewards: tf.Tensor, mask: tf.Tensor, discount: float,
               lam: float) -> tf.Tensor:
    """Normalised GAE advantages ``[T, N, H]`` with a linear baseline fitted to each task's
    discounted returns."""
    returns = discounted_cumsum(rewards * mask, discount)
    values = fit_baseline(obs, returns, mask)
    return normalize(gae(rewards, values, mask, discount, lam), mask)
