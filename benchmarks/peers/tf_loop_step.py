"""The plain TensorFlow reference step: Conv-4 MAML written directly in TF (``tf.nn.conv2d``,
batch norm from its formulas), one task at a time in a Python loop inside one
``tf.function`` without XLA, nested ``GradientTape``s, Keras Adam. What a TF user writes
without maml_tf. Runs in maml_tf's environment; started by ``compare.py``."""

import sys
import time

import keras
import tensorflow as tf

import _protocol as P


def forward(p, x):
    for i in range(4):
        x = tf.nn.conv2d(x, p[f"conv{i}"], 2, "SAME")
        mean = tf.reduce_mean(x, [0, 1, 2])
        # The variance from its formula: tf.nn.moments stops the gradient through the mean.
        var = tf.reduce_mean(tf.square(x - mean), [0, 1, 2])
        x = tf.nn.relu((x - mean) * tf.math.rsqrt(var + P.EPS) * p[f"gamma{i}"] + p[f"beta{i}"])
    return tf.reduce_mean(x, [1, 2]) @ p["head_w"] + p["head_b"]


def loss(p, x, y):
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, forward(p, x)))


def main():
    config = P.CONFIGS[sys.argv[1]]
    variables = {k: tf.Variable(v) for k, v in P.conv4_params().items()}
    names = list(variables)
    optimizer = keras.optimizers.Adam(P.META_LR)
    batch = tuple(tf.constant(a) for a in P.episode())

    @tf.function
    def step(sx, sy, qx, qy):
        with tf.GradientTape() as outer:
            losses = []
            for t in range(P.TASKS):
                fast = {k: tf.convert_to_tensor(v) for k, v in variables.items()}
                for _ in range(config["inner_steps"]):
                    with tf.GradientTape() as inner:
                        inner.watch(list(fast.values()))
                        l_in = loss(fast, sx[t], sy[t])
                    g = inner.gradient(l_in, [fast[k] for k in names])
                    if config["first_order"]:
                        g = [tf.stop_gradient(d) for d in g]
                    fast = {k: fast[k] - P.INNER_LR * d for k, d in zip(names, g)}
                losses.append(loss(fast, qx[t], qy[t]))
            meta = tf.add_n(losses) / P.TASKS
        grads = outer.gradient(meta, [variables[k] for k in names])
        optimizer.apply(grads, [variables[k] for k in names])
        return meta

    t0 = time.perf_counter()
    float(step(*batch))
    P.reply(ready=True, compile_s=time.perf_counter() - t0,
            framework=f"tensorflow {tf.__version__} (tf.function loop, no XLA)")
    matmul = tf.function(lambda a: a @ a)
    P.serve(lambda: step(*batch), lambda v: float(v),
            lambda: P.time_matmul(lambda n: matmul(tf.ones((n, n))), lambda v: v.numpy()))


if __name__ == "__main__":
    main()
