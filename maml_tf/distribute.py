"""``make_strategy(config)``: the one ``tf.distribute`` strategy of a run, and the
multi-worker fault handling: a stop signal on any worker is agreed by all (``any_worker``),
and a lost worker ends the others with one paragraph and ``LOST_WORKER_EXIT``
(``lost_worker``).

On a machine without accelerators, ``--cpu_devices=N`` splits the CPU into N logical
devices, so that ``--strategy=mirrored`` runs N replicas on one host (how the tests
check distribution here). It must run before TensorFlow initialises its devices, which
is why the entry point builds the strategy first.
"""

from __future__ import annotations

import glob
import json
import os
import re

import numpy as np
import tensorflow as tf

from maml_tf.config import ConfigError


def make_strategy(config) -> tf.distribute.Strategy:
    if config.cpu_devices:
        _split_cpu(config.cpu_devices)
    if config.strategy == "default":
        strategy = tf.distribute.get_strategy()
    elif config.strategy == "mirrored":
        strategy = tf.distribute.MirroredStrategy(devices=_local_devices())
    elif config.strategy == "multi_worker":
        strategy = _multi_worker_strategy()
    else:
        strategy = _tpu_strategy(config.tpu)
    replicas = strategy.num_replicas_in_sync
    if config.meta_batch_size % replicas:
        raise ConfigError(
            f"--meta_batch_size={config.meta_batch_size} cannot be split evenly over the "
            f"{replicas} replicas of --strategy={config.strategy}; use a multiple of {replicas}.")
    if config.task_chunks and (config.meta_batch_size // replicas) % config.task_chunks:
        raise ConfigError(
            f"--task_chunks={config.task_chunks} does not divide the "
            f"{config.meta_batch_size // replicas} tasks of each of the {replicas} replicas; "
            "pick a divisor of --meta_batch_size / replicas.")
    return strategy


def choose_task_chunks(config, model, strategy: tf.distribute.Strategy) -> int:
    """``--task_chunks=0`` (auto): how many sequential chunks each replica's tasks are split
    into, from the shapes and the machine.

    On a CPU, a chunk's working set should stay in the last-level cache: each chunk holds
    the largest number of tasks (a divisor of the replica's tasks) whose one forward pass
    over support and query examples, every layer's output counted once, fits in a quarter
    of the L3 cache (``cpu_cache_bytes``). A quarter, because the step holds several arrays
    per activation (im2col columns, gradients, second-order tangents) and the L3 is shared
    with the other cores. Measured on a 2-core AVX-512 CPU with 32 MiB of L3, in one
    session (tasks/s, second order): Omniglot 5w1s, 32 tasks of 2 MB -> 8 chunks of 4 tasks,
    214 against 186 with 2 chunks of 16 (the whole L3) and 194 with 16 of 2; first order 359
    against 329; Omniglot 20w1s, 16 tasks of 8 MB -> 16 chunks of one task, 13.6 against
    12.5 with 4 chunks, and 1.9 instead of 3.3 GB. Where one task alone is bigger than that,
    chunks cannot keep anything in cache and one chunk is fastest: mini-ImageNet 5w1s
    (4 tasks of about 200 MB), 0.85 tasks/s against 0.58 with a chunk per task, which
    bounds memory instead (5.9 against 3.7 GB; set --task_chunks for that). On GPUs and
    TPUs, one chunk: their throughput grows with the batch.
    """
    tasks = config.meta_batch_size // strategy.num_replicas_in_sync
    accelerated = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU")
    if config.is_rl or tasks <= 1 or accelerated:
        return 1
    per_task = activation_bytes_per_example(model) * examples_per_task(config)
    if per_task <= 0:
        return 1
    budget = cpu_cache_bytes() // 4
    fits = [d for d in divisors(tasks) if d * per_task <= budget]
    return tasks // max(fits) if fits else 1


def divisors(n: int) -> list[int]:
    """The divisors of ``n`` >= 1, ascending, in O(sqrt(n)) (a loop to n hung for minutes on a
    mistyped --meta_batch_size=1000000000)."""
    small = [d for d in range(1, int(n ** 0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def check_memory(config) -> None:
    """Refuses a meta-batch whose input tensors alone exceed this machine's memory, before
    anything is written (with a mistyped --meta_batch_size the pipeline would otherwise
    grind for minutes before running out)."""
    if config.is_rl:
        return
    per_example = 1 if config.is_regression else int(np.prod(config.image_shape))
    needed = config.meta_batch_size * examples_per_task(config) * per_example * 4   # float32
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if needed > total:
        raise ConfigError(f"--meta_batch_size={config.meta_batch_size} needs {needed / 2**30:,.0f} GiB "
                          f"for one meta-batch's inputs alone ({examples_per_task(config)} examples "
                          f"per task), more than this machine's {total / 2**30:.0f} GiB: lower "
                          "--meta_batch_size (or the shots and queries).")


def examples_per_task(config) -> int:
    """Support plus query examples of one training task."""
    if config.is_regression:
        return config.shot + config.queries
    return config.way * (config.shot + config.queries)


def activation_bytes_per_example(model) -> int:
    """Bytes of every layer's output for one example (0 when the model does not say)."""
    total = 0
    try:
        for layer in model.layers:
            shape = layer.output.shape
            size = 1
            for dim in shape[1:]:
                size *= int(dim)
            total += size * tf.as_dtype(layer.output.dtype).size
    except (AttributeError, ValueError, TypeError):
        return 0
    return total


def cpu_cache_bytes() -> int:
    """The largest (last-level) cache of CPU 0, from sysfs; 32 MiB when it cannot be read."""
    sizes = []
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(index) as f:
                text = f.read().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * scale)
        except (OSError, ValueError):
            continue
    return max(sizes, default=32 << 20)


def _split_cpu(n: int) -> None:
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current and len(current) == n:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
    except RuntimeError as e:
        raise ConfigError(f"--cpu_devices={n} must be set before TensorFlow initialises its "
                          f"devices (start a fresh process): {e}") from e


def _local_devices() -> list[str]:
    gpus = tf.config.list_logical_devices("GPU")
    return [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]


def _multi_worker_strategy() -> tf.distribute.Strategy:
    if not tf_config():
        raise ConfigError("--strategy=multi_worker needs TF_CONFIG in the environment, e.g. "
                          '{"cluster": {"worker": ["host1:port", "host2:port"]}, '
                          '"task": {"type": "worker", "index": 0}} on each worker.')
    # Physical, not logical, devices: listing logical ones would start the runtime, and
    # collective ops must be configured before that. NCCL on GPUs, ring over gRPC on CPUs.
    impl = tf.distribute.experimental.CommunicationImplementation
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=impl.AUTO if tf.config.list_physical_devices("GPU") else impl.RING)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    fd = os.environ.pop(STARTED_FD, None)
    if fd:   # tell the supervising process (cli.supervised_worker) the wait is over
        os.write(int(fd), b"1")
        os.close(int(fd))
    return strategy


# The environment variable naming the pipe on which a supervised multi-worker process says
# that every worker of the cluster has started (see ``cli.supervised_worker``).
STARTED_FD = "MAML_TF_STARTED_FD"


def any_worker(strategy: tf.distribute.Strategy, flag: bool) -> bool:
    """Whether ``flag`` is true on any worker of a multi-worker ``strategy`` (a one-number
    all-reduce that every worker must call at the same point); ``flag`` elsewhere."""
    if not getattr(strategy.extended, "_in_multi_worker_mode", lambda: False)():
        return flag
    value = strategy.run(lambda: tf.constant(1.0 if flag else 0.0))
    return bool(strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None) > 0)


# The exit code of a worker whose cluster lost a worker: a cluster manager (maml_tf.launch,
# Kubernetes, Slurm) restarts the whole cluster, which resumes from the last checkpoint.
LOST_WORKER_EXIT = 75   # EX_TEMPFAIL


def lost_worker(error: BaseException) -> str | None:
    """One paragraph for an error of a multi-worker run that means a worker was lost (died,
    stopped or unreachable), naming it; None for any other error."""
    if not tf_config() or not isinstance(error, (tf.errors.UnavailableError,
                                                 tf.errors.AbortedError,
                                                 tf.errors.DeadlineExceededError,
                                                 tf.errors.CancelledError,
                                                 tf.errors.InternalError)):
        return None
    text = str(error)
    unhealthy = text.split("unhealthy", 1)[-1] if "unhealthy" in text else text
    tasks = sorted({f"{kind} {index}" for kind, index in
                    re.findall(r"/job:(\w+)/(?:replica:\d+/)?task:(\d+)", unhealthy)})
    me = tf_config()["task"]
    tasks = [t for t in tasks if t != f"{me['type']} {me.get('index', 0)}"] or tasks
    who = " and ".join(tasks) if tasks else "a worker of the cluster"
    return (f"Lost {who} of the multi-worker cluster (it died, was stopped or became "
            f"unreachable), so this {me['type']} {me.get('index', 0)} stopped too. The last "
            f"checkpoint is intact: restart every worker with the same command to resume from it "
            f"(maml_tf.launch does so by itself; exit code {LOST_WORKER_EXIT} asks a cluster "
            f"manager to restart). TensorFlow said: {text.strip().splitlines()[0][:200]}")


def _on_tpu_host() -> bool:
    """A local TPU (TPU VM) or a named one; looked up without any network request."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
                or os.environ.get("TPU_NAME") or os.environ.get("COLAB_TPU_ADDR"))


def _tpu_strategy(address: str) -> tf.distribute.Strategy:
    if not address and not _on_tpu_host():
        raise ConfigError(
            "--strategy=tpu found no TPU: this machine has no local TPU device (/dev/accel*) "
            "and --tpu is empty. Run on a Cloud TPU VM, or pass --tpu=<name or "
            "grpc://host:8470>; on CPU or GPU use --strategy=default or --strategy=mirrored.")
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=address or "local")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, tf.errors.OpError, RuntimeError) as e:
        raise ConfigError(f"--strategy=tpu could not reach the TPU --tpu={address!r}: {e}") from e
    return tf.distribute.TPUStrategy(resolver)


def tf_config() -> dict:
    """The ``TF_CONFIG`` environment variable, checked: ``{}`` when unset; a ``ConfigError``
    naming what is wrong when it is not a cluster description this worker belongs to."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return {}
    example = ('e.g. TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
               '"task": {"type": "worker", "index": 0}}\'')
    try:
        value = json.loads(raw)
    except ValueError as e:
        raise ConfigError(f"TF_CONFIG is not valid JSON ({e}): {raw[:80]!r}. Set it to the "
                          f"cluster and this worker's task, {example}.") from None
    cluster, task = (value.get("cluster"), value.get("task")) if isinstance(value, dict) else (None, None)
    if not isinstance(cluster, dict) or not all(isinstance(v, list) for v in cluster.values()) \
            or not isinstance(task, dict):
        raise ConfigError(f"TF_CONFIG needs a \"cluster\" of address lists and this worker's "
                          f"\"task\", {example}; got {raw[:80]!r}.")
    kind, index = task.get("type"), task.get("index", 0)
    if kind not in cluster or not isinstance(index, int) or not 0 <= index < len(cluster[kind]):
        size = len(cluster.get(kind, [])) if isinstance(kind, str) else 0
        raise ConfigError(f"TF_CONFIG's task {{type: {kind!r}, index: {index!r}}} is not in its "
                          f"cluster ({', '.join(f'{k}: {len(v)}' for k, v in cluster.items())}): "
                          f"the index must be 0..{max(size - 1, 0)} of a type the cluster lists.")
    return value


def is_chief() -> bool:
    """True on the worker that owns the workdir (the only one, unless multi-worker)."""
    tf_config_ = tf_config()
    task = tf_config_.get("task", {})
    return task.get("type", "chief") == "chief" or (
        task.get("type") == "worker" and task.get("index", 0) == 0
        and "chief" not in tf_config_.get("cluster", {}))


def worker_workdir(workdir: str) -> str:
    """Non-chief workers write their (identical) checkpoints and logs to a subfolder, so
    that they never race the chief for the same files."""
    if is_chief():
        return workdir
    task = tf_config()["task"]
    return os.path.join(workdir, "workers", f"{task['type']}-{task['index']}")
