"""Episode pipelines: ``train_dataset(config, ...)`` and ``eval_dataset(config, split, ...)``
-> ``tf.data`` of ``Episode``.

Each element is one meta-batch of tasks for one input pipeline (one replica's share
when distributed); see ``data.episode.Episode`` for shapes and ``data.tasks`` for how
tasks are seeded. The classes of each split come from the dedicated Omniglot and
mini-ImageNet loaders or the generic image path (``data/generic.py``: folders, TFDS, data
passed from Python), as ``data.classes.ClassImages``, and one sampler (``data/few_shot.py``)
draws every image task.
"""

from __future__ import annotations

import functools

import tensorflow as tf
from absl import logging

from maml_tf.config import GENERIC_ONLY, IMAGE_SOURCES, TFDS_PREFIX, Config, DataConfig
from maml_tf.data import few_shot, generic, sinusoid
from maml_tf.data.classes import ClassImages
from maml_tf.data.episode import Episode
from maml_tf.data.errors import DataError
from maml_tf.data.tasks import task_indices, task_seed
from maml_tf.distribute import divisors


@functools.lru_cache(maxsize=8)
def _dedicated(dataset: str, data_dir: str, source: str, split_name: str, split: str,
               rotations: str) -> ClassImages:
    if dataset == "omniglot":
        from maml_tf.data import omniglot
        return ClassImages.from_grouped(
            omniglot.load_split(data_dir, source, split_name, split, rotations))
    from maml_tf.data import mini_imagenet
    return ClassImages.from_grouped(mini_imagenet.load_split(data_dir, split),
                                    mini_imagenet.class_names(data_dir, split))


def load_generic(config, data=None) -> generic.GenericData:
    """The splits of a generic image source: a folder or TFDS data set is read once per
    process (keyed by the data section alone, so the runs of a sweep share it); Python
    ``data`` as given."""
    if data is None and config.dataset != "python":
        return _generic_cached(config.data)
    return generic.load(config, data)


@functools.lru_cache(maxsize=4)
def _generic_cached(section: DataConfig) -> generic.GenericData:
    return generic.load(Config(data=section))


@functools.lru_cache(maxsize=8)
def _generic_rotated(section: DataConfig, split: str) -> ClassImages:
    return _generic_cached(section).splits[split].rotated()


def test_config(config) -> Config:
    """The config whose data the final test tasks come from: ``config``, or with
    ``--eval_dataset`` another data set's test split at this network's image shape
    (cross-domain evaluation, e.g. mini-ImageNet -> CUB)."""
    target = config.eval_dataset
    if not target:
        return config
    generic = target in IMAGE_SOURCES or target.startswith(TFDS_PREFIX)
    height, _, channels = config.image_shape
    values = {**config.to_flat_dict(), **{n: DataConfig.default(n) for n in GENERIC_ONLY},
              "dataset": target, "data_dir": config.eval_data_dir,
              "train_rotations": "auto", "eval_rotations": "auto",
              "image_size": height if generic else 0, "channels": channels if generic else 0,
              "eval_dataset": "", "eval_data_dir": "", "eval_split_file": ""}
    if generic:
        values.update(split_file=config.eval_split_file, cache_dir=config.cache_dir)
    test = Config.from_dict(values)
    if tuple(test.image_shape) != tuple(config.image_shape):
        raise DataError(f"--eval_dataset={target} has {test.image_shape} images but the network "
                        f"takes {config.image_shape}: evaluate across domains at the network's "
                        "image shape (a folder or TFDS data set is resized to it).")
    return test


def describe_splits(config, data=None) -> dict | None:
    """Which classes each split holds, for the workdir's ``split.json`` (None for sinusoid)."""
    if config.dataset == "omniglot":
        from maml_tf.data import omniglot
        idx = omniglot.split_indices(config.split)
        return {"dataset": "omniglot", "split": config.split,
                "character_index": "into background (0..963) then evaluation (964..1622), "
                                   "each in official character-id order",
                "train_rotations": config.rotations("train"),
                "eval_rotations": config.rotations("val"),
                **{s: [int(i) for i in v] for s, v in idx.items()}}
    if config.dataset == "mini_imagenet":
        from maml_tf.data import mini_imagenet
        return {"dataset": "mini_imagenet", "split": "ravi",
                **{s: mini_imagenet.class_names(config.data_dir, s) for s in ("train", "val", "test")}}
    if config.is_generic_images:
        return {**load_generic(config, data).description,
                "train_rotations": config.rotations("train"),
                "eval_rotations": config.rotations("val")}
    return None


def split_images(config, split: str, data=None) -> ClassImages:
    """The classes of one split (rotated copies counting as classes), cached per process."""
    rotations = config.rotations(split)
    if config.is_generic_images:
        if rotations == "augment" and data is None and config.dataset != "python":
            return _generic_rotated(config.data, split)
        classes = load_generic(config, data).splits[split]
        return classes.rotated() if rotations == "augment" else classes
    return _dedicated(config.dataset, config.data_dir, config.data_source, config.split,
                      split, rotations)


def queries_of(config, split: str) -> int:
    """Queries per class (points per sinusoid task): ``--query`` in training, the evaluation
    protocol's ``--eval_queries`` (default: the same) for validation and test tasks."""
    return config.queries if split == "train" else config.test_queries


def usable_classes(config, split: str, shot: int, data=None) -> ClassImages:
    """The classes of ``split`` with at least ``shot`` + queries images (the others are left
    out of that split, with a warning that names them); ``DataError`` if fewer than
    ``config.way`` remain (checked before training, not at the first validation hours
    later)."""
    classes = split_images(config, split, data)
    need = shot + queries_of(config, split)
    usable, dropped = classes.without_small(need)
    if dropped and (split, need) not in _WARNED:
        _WARNED.add((split, need))
        logging.warning("%d class(es) of the %s split have fewer than %d images (%d shots + %d "
                        "queries) and are left out of it: %s%s", len(dropped), split, need, shot,
                        need - shot, ", ".join(dropped[:10]), " ..." if len(dropped) > 10 else "")
    if usable.num_classes < config.way:
        most = int(classes.counts.max()) if classes.num_classes else 0
        raise DataError(
            f"The {split} split of {config.dataset} has {usable.num_classes} classes with at "
            f"least {need} images ({classes.num_classes} classes in all, the largest with {most} "
            f"images), too few for --way={config.way} with {shot} shots + {need - shot} queries "
            "per class; lower --way, --shot, --eval_shots, --query or --eval_queries.")
    return usable


_WARNED: set = set()


def check_split(config, split: str, shot: int, data=None) -> None:
    """Raises ``DataError`` if ``split`` cannot give ``config.way``-way tasks of ``shot``
    shots and its queries per class."""
    if not config.is_regression:
        usable_classes(config, split, shot, data)


def _task_fn(config, split: str, shot: int, stream: int, data=None):
    queries = queries_of(config, split)
    if config.is_regression:
        return lambda i: sinusoid.sample_task(stream, i, shot, queries)
    classes = usable_classes(config, split, shot, data)
    gather = few_shot.gather_fn(classes)
    return lambda i: few_shot.sample_task(classes, stream, i, config.way, shot, queries,
                                          shuffle_support=config.shuffled_support, gather=gather)


def _to_episodes(indices: tf.data.Dataset, task_fn, batch: int) -> tf.data.Dataset:
    ds = indices.map(task_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch, drop_remainder=True)
    return ds.map(lambda *t: Episode(*t)).prefetch(tf.data.AUTOTUNE)


def train_dataset(config, input_context: tf.distribute.InputContext | None = None,
                  first_step: int = 0, data=None) -> tf.data.Dataset:
    """Endless training episodes from iteration ``first_step`` on.

    The per-pipeline task count comes from the input context, so the global meta-batch
    is split evenly across replicas.
    """
    pipelines = input_context.num_input_pipelines if input_context else 1
    pipeline_id = input_context.input_pipeline_id if input_context else 0
    local = (input_context.get_per_replica_batch_size(config.meta_batch_size)
             if input_context else config.meta_batch_size)
    # A pipeline serves consecutive replicas: its share of each iteration's tasks is
    # cut into per-replica batches in order.
    per_pipeline = config.meta_batch_size // pipelines
    indices = task_indices(first_step, config.meta_batch_size, per_pipeline, pipeline_id)
    stream = task_seed(config.seed, "train")
    return _to_episodes(indices, _task_fn(config, "train", config.shot, stream, data), local)


def eval_batch_size(num_tasks: int, preferred: int, multiple_of: int = 1) -> int:
    """Largest divisor of ``num_tasks`` not above ``preferred`` that ``multiple_of`` (the
    replica count) divides: every batch is full, so the compiled step keeps one shape and
    no task is dropped or repeated."""
    # Over the divisors of num_tasks, not every integer up to `preferred`, which a mistyped
    # --meta_batch_size can make huge.
    sizes = [b for b in divisors(num_tasks)
             if b % multiple_of == 0 and b <= max(preferred, multiple_of)]
    if not sizes:
        raise ValueError(f"{num_tasks} evaluation tasks cannot be split evenly over "
                         f"{multiple_of} replicas; use a multiple of {multiple_of}.")
    return sizes[-1]


def eval_dataset(config, split: str, num_tasks: int, shot: int | None = None,
                 batch: int | None = None, data=None) -> tf.data.Dataset:
    """The fixed evaluation tasks ``0 .. num_tasks-1`` of a split, seeded by ``eval_seed``."""
    shot = shot or config.shot
    batch = batch or eval_batch_size(num_tasks, config.meta_batch_size)
    stream = task_seed(config.eval_seed, split, f"shot{shot}")
    indices = tf.data.Dataset.range(num_tasks)
    return _to_episodes(indices, _task_fn(config, split, shot, stream, data), batch)
