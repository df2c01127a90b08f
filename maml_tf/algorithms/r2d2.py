"""R2-D2 (Bertinetto et al. 2019): a ridge-regression head solved in closed form."""

from __future__ import annotations

import tensorflow as tf

from maml_tf.algorithms._embedding import EmbeddingLearner


class R2D2(EmbeddingLearner):
    """R2-D2 (Bertinetto et al. 2019): ridge regression differentiable discriminator.

    For each task, the support embeddings ``X [N_s, D]`` regress the one-hot labels
    ``Y [N_s, way]`` with ridge penalty lambda:
    ``W = (X^T X + lambda I)^-1 X^T Y``, computed in the Woodbury form
    ``W = X^T (X X^T + lambda I)^-1 Y`` when there are fewer support examples than features
    (an ``N_s x N_s`` system instead of ``D x D``; the same matrix). Query logits are
    ``alpha * X_q W + beta``. lambda (through its logarithm, so it stays positive), alpha and
    beta are meta-learned with the body; gradients flow through the solve.
    """

    def __init__(self, model, *, ridge: float = 1.0, scale: float = 1.0, **kwargs):
        super().__init__(model, **kwargs)
        if not ridge > 0:
            raise ValueError(f"R2-D2 needs a positive initial ridge penalty, got {ridge}.")
        dtype = self.net.variables[0].dtype
        self.extra = [tf.Variable(tf.math.log(tf.constant(float(ridge), dtype)),
                                  name="r2d2_log_lambda"),
                      tf.Variable(tf.constant(float(scale), dtype), name="r2d2_scale"),
                      tf.Variable(tf.constant(0.0, dtype), name="r2d2_bias")]

    def head(self, support, support_y, query, extra):
        log_lam, scale, bias = extra[:3]
        return scale * tf.matmul(query, ridge_solution(support, support_y, self.way,
                                                      tf.exp(log_lam))) + bias

    def write_summaries(self, step):
        tf.summary.scalar("r2d2/lambda", tf.exp(self.extra[0]), step=step)
        tf.summary.scalar("r2d2/scale", self.extra[1], step=step)
        tf.summary.scalar("r2d2/bias", self.extra[2], step=step)


def ridge_solution(x: tf.Tensor, labels: tf.Tensor, way: int, lam: tf.Tensor) -> tf.Tensor:
    """Ridge weights ``[T, D, way]`` for inputs x ``[T, N, D]`` and integer labels ``[T, N]``
    (one-hot targets), penalty lam > 0; Woodbury form when N < D."""
    n, d = x.shape[1], x.shape[2]
    y = tf.one_hot(labels, way, dtype=x.dtype)
    lam = tf.cast(tf.convert_to_tensor(lam, dtype_hint=x.dtype), x.dtype)
    if n < d:
        gram = tf.matmul(x, x, transpose_b=True) + lam * tf.eye(n, dtype=x.dtype)      # [T, N, N]
        return tf.matmul(x, tf.linalg.solve(gram, y), transpose_a=True)
    cov = tf.matmul(x, x, transpose_a=True) + lam * tf.eye(d, dtype=x.dtype)           # [T, D, D]
    return tf.linalg.solve(cov, tf.matmul(x, y, transpose_a=True))
