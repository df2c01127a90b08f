"""The generic image pipeline at tieredImageNet's size: cache build rate, tasks/s of the input
pipeline alone, and the peak memory of a training process that samples from a 16 GB cache.

    python benchmarks/data_pipeline.py --work=/tmp/pipeline   # needs ~17 GB of free disk
    python benchmarks/data_pipeline.py --work=/tmp/pipeline --parts=decode,pipeline

Parts (each in a subprocess of its own, so peak RSS is its own):

* ``decode``: builds the cache of an image folder of ``--decode_images`` real JPEGs (the
  mini-ImageNet sample's files, linked many times over: real decoding work) at 84x84 and
  prints images/s, and what that rate means for tieredImageNet's 779,165 images;
* ``cache``: writes a synthetic cache of tieredImageNet's shape (608 classes of 1,281 images,
  84x84x3 uint8 = 16.6 GB) through the cache writer, and prints the write rate;
* ``pipeline``: the training episodes of mini-ImageNet 5-way 1-shot (15 queries, meta-batch
  4) sampled from that cache alone: tasks/s, against what the meta-step consumes here;
* ``train``: ``maml_tf.train`` on that cache (the 5w1s flags of runs/mini_imagenet_5w1s.cfg,
  ``--train_iterations`` iterations) and its process's peak RSS; ``train_baseline``: the same
  run on 608 x 20 in-memory images, so that the difference is what the data costs.

The synthetic pixels are random (a 64 MiB random block tiled), so the disk holds real bytes.
Nothing here is run by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import machine  # benchmarks/machine.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIERED_CLASSES, TIERED_PER_CLASS, TIERED_IMAGES = 608, 1281, 779_165
SHAPE = (84, 84, 3)
SPLIT = (351, 97, 160)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _synthetic_classes(work: str):
    """The synthetic tieredImageNet-sized cache as ``ClassImages`` over a ``RowFile``."""
    import numpy as np
    from maml_tf.data.classes import ClassImages
    from maml_tf.data.rowfile import RowFile
    path = os.path.join(work, "tiered_synthetic.npy")
    rows = RowFile(path)
    counts = np.full(TIERED_CLASSES, TIERED_PER_CLASS, np.int64)
    starts = np.arange(TIERED_CLASSES, dtype=np.int64) * TIERED_PER_CLASS
    return ClassImages(rows, starts, counts, tuple(f"n{c:08d}" for c in range(TIERED_CLASSES)))


def part_decode(args) -> dict:
    import numpy as np   # noqa: F401 -- keeps the import cost out of the timing below
    from maml_tf.config import Config
    from maml_tf.data import generic
    sample = os.path.join(ROOT, "..", "shared", "data", "mini_imagenet_sample", "images")
    files = sorted(os.listdir(sample))
    root = os.path.join(args.work, "decode_folder")
    if not os.path.isdir(root):
        for i in range(args.decode_images):
            folder = os.path.join(root, f"c{i % 608:03d}")
            os.makedirs(folder, exist_ok=True)
            os.symlink(os.path.join(sample, files[i % len(files)]), os.path.join(folder, f"{i}.jpg"))
    config = Config(dataset="folder", data_dir=root, image_size=84, class_split=(300, 150, 158),
                    cache_dir=os.path.join(args.work, f"cache-{time.time_ns()}"))
    t0 = time.perf_counter()
    generic.load(config)
    seconds = time.perf_counter() - t0
    return {"images": args.decode_images, "seconds": round(seconds, 1),
            "images_per_s": round(args.decode_images / seconds),
            "tiered_minutes": round(TIERED_IMAGES / (args.decode_images / seconds) / 60, 1)}


def part_cache(args) -> dict:
    import numpy as np
    from maml_tf.data.rowfile import RowFile
    path = os.path.join(args.work, "tiered_synthetic.npy")
    n = TIERED_CLASSES * TIERED_PER_CLASS
    rows = RowFile(path, (n,) + SHAPE)
    block = np.random.default_rng(0).integers(0, 256, ((64 << 20) // (84 * 84 * 3),) + SHAPE,
                                              dtype=np.uint8)
    t0 = time.perf_counter()
    for start in range(0, n, len(block)):
        rows[start:start + len(block)] = block[:min(len(block), n - start)]
    rows.flush()
    seconds = time.perf_counter() - t0
    gb = rows.nbytes / 1e9
    return {"gb": round(gb, 2), "seconds": round(seconds, 1), "gb_per_s": round(gb / seconds, 2)}


def part_pipeline(args) -> dict:
    import tensorflow as tf
    from maml_tf import data as data_lib
    from maml_tf.config import Config
    from maml_tf.data import python_source
    # The path of maml_tf.train(..., data=classes): the same ClassImages a folder's cache opens.
    data = python_source.prepare(_synthetic_classes(args.work))
    config = Config(dataset="python", image_size=84, channels=3, class_split=SPLIT, way=5,
                    shot=1, query=15, meta_batch_size=4)
    ds = data_lib.train_dataset(config, data=data)
    it = iter(ds)
    for _ in range(5):   # warm-up: tracing and the first reads
        next(it)
    t0 = time.perf_counter()
    for _ in range(args.pipeline_batches):
        batch = next(it)
    float(tf.reduce_sum(batch.support_x))
    seconds = time.perf_counter() - t0
    tasks = args.pipeline_batches * config.meta_batch_size
    return {"tasks_per_s": round(tasks / seconds, 1), "tasks": tasks,
            "peak_rss_mb": round(_peak_rss_mb())}


def part_train(args, baseline: bool = False) -> dict:
    import numpy as np
    from maml_tf import api
    from maml_tf.config import Config
    from maml_tf.data.classes import ClassImages
    if baseline:   # the same run on a small in-memory data set: what the network costs alone
        images = np.random.default_rng(0).integers(0, 256, (TIERED_CLASSES * 20,) + SHAPE,
                                                   dtype=np.uint8)
        classes = ClassImages.from_labelled(images, np.repeat(np.arange(TIERED_CLASSES), 20))
    else:
        classes = _synthetic_classes(args.work)
    flags = dict(way=5, shot=1, query=15, inner_steps=5, inner_lr=0.01, meta_batch_size=4,
                 num_filters=32, conv_pool="max", num_iterations=args.train_iterations,
                 val_tasks=20, eval_tasks=20, eval_every=args.train_iterations,
                 checkpoint_every=args.train_iterations, log_every=10,
                 class_split=SPLIT, dataset="python", task_chunks=args.task_chunks)
    workdir = os.path.join(args.work, f"train-{time.time_ns()}")
    t0 = time.perf_counter()
    api.train(Config(**flags), workdir, data=classes)
    seconds = time.perf_counter() - t0
    with open(os.path.join(workdir, "history.json")) as f:
        history = json.load(f)
    return {"iterations": args.train_iterations, "task_chunks": args.task_chunks,
            "seconds": round(seconds, 1), "peak_rss_mb": round(_peak_rss_mb()),
            "validations": len(history)}


PARTS = {"decode": part_decode, "cache": part_cache, "pipeline": part_pipeline,
         "train": part_train, "train_baseline": lambda args: part_train(args, baseline=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="a folder with ~17 GB free")
    parser.add_argument("--parts", default="decode,cache,pipeline,train")
    parser.add_argument("--decode_images", type=int, default=20000)
    parser.add_argument("--pipeline_batches", type=int, default=200)
    parser.add_argument("--train_iterations", type=int, default=30)
    parser.add_argument("--task_chunks", type=int, default=0,
                        help="--task_chunks of the training parts (0: chosen by maml_tf)")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    if args.part:
        print(json.dumps(PARTS[args.part](args)))
        return
    print(json.dumps(machine.machine()))
    for part in args.parts.split(","):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        out = subprocess.run([sys.executable, __file__, f"--part={part}"] +
                             [a for a in sys.argv[1:] if not a.startswith("--parts")],
                             capture_output=True, text=True, env=env)
        result = out.stdout.strip().splitlines()[-1] if out.returncode == 0 else \
            f"failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}"
        print(f"{part}: {result}", flush=True)


if __name__ == "__main__":
    main()
