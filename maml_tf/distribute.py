"""``make_strategy(config)``: the one ``tf.distribute`` strategy of a run."""

from __future__ import annotations

import tensorflow as tf

from maml_tf.config import ConfigError


def make_strategy(config) -> tf.distribute.Strategy:
    if config.strategy == "default":
        strategy = tf.distribute.get_strategy()
    elif config.strategy == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
    elif config.strategy == "multi_worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        strategy = _tpu_strategy(config.tpu)
    replicas = strategy.num_replicas_in_sync
    if config.meta_batch_size % replicas:
        raise ConfigError(
            f"--meta_batch_size={config.meta_batch_size} cannot be split evenly over the "
            f"{replicas} replicas of --strategy={config.strategy}; use a multiple of {replicas}.")
    return strategy


def _tpu_strategy(address: str) -> tf.distribute.Strategy:
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=address or None)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, tf.errors.OpError, RuntimeError) as e:
        raise ConfigError(
            f"--strategy=tpu found no TPU (--tpu={address!r}): {e}. Run on a Cloud TPU VM "
            "(leave --tpu empty) or pass --tpu=<name or grpc://host:8470>; on CPU or GPU use "
            "--strategy=default or --strategy=mirrored.") from e
    return tf.distribute.TPUStrategy(resolver)
