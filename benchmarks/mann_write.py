"""MANN's write vector on a toy task: what the memory must learn, without images to learn.

    python benchmarks/mann_write.py [--iterations=1500] [--every=250] [--writes=add,key]

Each episode draws 5 fresh prototypes in R^32 (standard normal) and shows 10 noisy instances
of each (noise 0.3) in a random order, then one query per class: a class can only be
recognised through memory, never through the weights. The body is one tanh Dense layer.
Meta-batch 16, Adam 1e-3, MANN's defaults otherwise (LSTM 200, memory 128 x 40, 4 heads).
Prints, every ``--every`` iterations, the accuracy on the 1st, 2nd, 3rd, 5th and 10th
instance of a class and on the queries, over 8 fresh meta-batches, for each write
(``--mann_write``: ``add``, a vector of its own; ``key``, the paper's equation). Runs on one
thread, so it can share the machine.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

DIM, WAY, SHOT, BATCH = 32, 5, 10, 16
COLUMNS = (0, 1, 2, 4, 9, 10)   # instances 1, 2, 3, 5, 10, then the queries


def run(write: str, iterations: int, every: int) -> None:
    import keras
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from maml_tf.algorithms import MANN
    from maml_tf.data.episode import Episode

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((DIM,)), keras.layers.Dense(DIM, activation="tanh"),
                              keras.layers.Dense(WAY)])
    learner = MANN(model, way=WAY, write=write)
    optimizer = keras.optimizers.Adam(1e-3)
    rng = np.random.default_rng(1)

    def episode() -> Episode:
        protos = rng.normal(size=(BATCH, WAY, DIM)).astype("float32")
        labels = np.stack([rng.permutation(np.repeat(np.arange(WAY), SHOT)) for _ in range(BATCH)])
        support = np.take_along_axis(protos, labels[:, :, None], 1)
        support = support + 0.3 * rng.normal(size=support.shape)
        query = protos + 0.3 * rng.normal(size=protos.shape)
        f32 = lambda a: tf.constant(a, tf.float32)
        return Episode(f32(support), tf.constant(labels, tf.int32), f32(query),
                       tf.constant(np.tile(np.arange(WAY), (BATCH, 1)), tf.int32))

    @tf.function
    def train(ep):
        loss, grads = learner.meta_gradient(ep, 0)
        optimizer.apply(grads, learner.meta_variables)
        return loss

    @tf.function
    def accuracy(ep):
        return learner.eval_metrics(learner.meta_weights(), ep, 0).accuracy

    start = time.time()
    for it in range(1, iterations + 1):
        loss = train(episode())
        if it % every == 0:
            acc = np.mean([accuracy(episode()).numpy().mean(0) for _ in range(8)], 0)
            cells = " | ".join(f"{100 * a:.0f}%" for a in acc[list(COLUMNS)])
            print(f"| {write} | {it} | {float(loss):.3f} | {cells} | {time.time() - start:.0f} |",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--writes", default="add,key")
    args = parser.parse_args()
    print("| write | iteration | loss | 1st | 2nd | 3rd | 5th | 10th | queries | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for write in args.writes.split(","):
        run(write, args.iterations, args.every)


if __name__ == "__main__":
    main()
