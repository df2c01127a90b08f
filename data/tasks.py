"""Stateless, seeded task sampling: task ``i`` of a split is a pure function of
``(seed, split, i)``.

That choice gives three properties for free: a resumed run sees exactly the tasks it
would have seen (the "RNG state" is the iteration counter in the checkpoint), workers
of a distributed run never sample identical tasks (each owns its own task indices), and
the fixed evaluation tasks are the same whatever the batch size.
"""

from __future__ import annotations

import zlib

import tensorflow as tf

SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def task_seed(seed: int, split: str, salt: str = "") -> int:
    """A 31-bit stream id for (seed, split, salt); stable across processes and versions."""
    return zlib.crc32(f"{seed}/{split}/{salt}".encode()) & 0x7FFFFFFF


def seeds_for(stream: int, index: tf.Tensor, count: int) -> tf.Tensor:
    """``count`` independent stateless seeds ``[count, 2]`` for task ``index`` of a stream."""
    base = tf.stack([tf.constant(stream, tf.int64), tf.cast(index, tf.int64)])
    return tf.random.experimental.stateless_split(base, num=count)


def task_indices(first_step: int, global_batch: int, local_batch: int,
                 pipeline_id: int) -> tf.data.Dataset:
    """Task indices of this input pipeline, from iteration ``first_step`` on, forever.

    Iteration ``s`` uses global tasks ``s*G .. s*G+G-1``; pipeline ``p`` takes the slice
    ``[p*B, (p+1)*B)`` of them, so pipelines never overlap.
    """
    offset = pipeline_id * local_batch

    def one_step(step):
        start = step * global_batch + offset
        return tf.data.Dataset.range(start, start + local_batch)

    return tf.data.Dataset.range(first_step, 2 ** 62).flat_map(one_step)
