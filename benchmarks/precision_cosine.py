"""How closely each --precision's meta-gradient points as float64's, on real Omniglot 5-way
1-shot episodes (the paper's network and step: Conv-4 with 64 filters, one inner step of 0.4,
second order), at the same initial weights.

    MAML_TF_DATA_DIR=../shared/data/omniglot python benchmarks/precision_cosine.py [--tasks=32]

Prints the machine, then the cosine of each precision's meta-gradient to float64's over all
weights, and the smallest over single weight tensors.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

import machine  # benchmarks/machine.py


def _episode(images, tasks, rng):
    """5-way 1-shot, one query per class, from the first 200 background characters."""
    import tensorflow as tf
    from maml_tf.data.episode import Episode
    cls = np.stack([rng.choice(len(images), 5, replace=False) for _ in range(tasks)])
    labels = tf.constant(np.tile(np.arange(5), (tasks, 1)), tf.int32)
    return Episode(tf.constant(images[cls, 0], tf.float64), labels,
                   tf.constant(images[cls, 1], tf.float64), labels, labels)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--precisions", default="float32,bfloat16,mixed_bfloat16")
    a = p.parse_args()
    print(f"Machine: {machine.describe(machine.machine())}", flush=True)
    import keras
    import tensorflow as tf
    from maml_tf.meta_learner import MetaLearner
    from maml_tf.models import zoo
    path = os.path.join(os.environ.get("MAML_TF_DATA_DIR", "../shared/data/omniglot"),
                        "images_background.npz")
    raw = np.load(path)["images"][:200, :2]        # True is paper: invert, as the loader does
    images = 1.0 - tf.image.resize(raw.reshape(-1, 105, 105, 1).astype("float32"), [28, 28],
                                   "area").numpy().reshape(200, 2, 28, 28, 1)
    ep64 = _episode(images, a.tasks, np.random.default_rng(0))
    keras.utils.set_random_seed(5)
    model64 = zoo.conv4((28, 28, 1), 5, dtype="float64")
    model32 = zoo.conv4((28, 28, 1), 5)
    model32.set_weights(model64.get_weights())
    ep32 = type(ep64)(*[tf.cast(t, tf.float32) if t.dtype == tf.float64 else t for t in ep64])

    def meta_gradient(model, precision, ep):
        learner = MetaLearner(model, inner_lr=0.4, compute_dtype=precision)

        @tf.function
        def grad(weights):
            with tf.GradientTape() as tape:
                tape.watch(weights)
                loss, _ = learner.meta_loss(weights, ep, 1)
            return tape.gradient(loss, weights)
        return [g.numpy().astype("float64")
                for g in grad([tf.constant(w) for w in learner.net.meta_weights()])]

    ref = meta_gradient(model64, None, ep64)
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    flat = lambda gs: np.concatenate([g.ravel() for g in gs])
    print(f"| precision | cosine to float64 ({a.tasks} tasks) | lowest of one weight tensor |")
    print("|---|---|---|")
    for precision in a.precisions.split(","):
        g = meta_gradient(model32, None if precision == "float32" else precision, ep32)
        worst = min(cos(x.ravel(), y.ravel()) for x, y in zip(ref, g))
        print(f"| {precision} | {cos(flat(ref), flat(g)):.4f} | {worst:.4f} |", flush=True)


if __name__ == "__main__":
    main()
