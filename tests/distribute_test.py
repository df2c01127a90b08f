"""tf.distribute: mirrored on two logical CPUs and two local workers match one device;
checkpoints move between strategies; a missing TPU fails fast.

Every run is a real ``python -m maml_tf.train`` subprocess, because logical devices and
TF_CONFIG must be set before TensorFlow starts.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from maml_tf import distribute
from maml_tf.config import Config, ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Float32 sums over tasks in another order (per replica, then all-reduced): the meta-weights
# after 6 Adam steps agree to about 1e-6; 1e-4 relative leaves room without hiding a bug
# (a wrong split or a missing all-reduce changes them by 1e-2 or more).
RTOL, ATOL = 1e-4, 1e-5


def _args(omniglot_dir, workdir, iterations=6, **extra):
    args = {"dataset": "omniglot", "data_dir": omniglot_dir, "way": 3, "shot": 1,
            "num_filters": 8, "inner_lr": 0.4, "meta_batch_size": 4,
            "num_iterations": iterations, "log_every": 2, "eval_every": 1000,
            "checkpoint_every": 2, "eval_tasks": 8, "val_tasks": 4, "workdir": workdir,
            # One meta-step program per run (every step scores its inner steps): the steps
            # without those scores compile apart (the mirrored run's meta-step compiled in
            # 43-56 s with both programs, 28 s with one).
            "step_metrics_every": 1, **extra}
    return [f"--{k}={v}" for k, v in args.items()]


def _launch(args, env_extra=None):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "maml_tf.train"] + args, cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _run(args, env_extra=None):
    proc = _launch(args, env_extra)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return err


def _weights(workdir):
    reader = tf.train.load_checkpoint(os.path.join(workdir, "checkpoints"))
    # Keras 3 saves the model's weights once, under the optimizer's references to them.
    names = [n for n in reader.get_variable_to_shape_map()
             if n.startswith("optimizer/_trainable_variables/")]
    assert len(names) >= 4, sorted(reader.get_variable_to_shape_map())
    return {n: reader.get_tensor(n) for n in names}


def _assert_same(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.fixture(scope="module")
def default_run(omniglot_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("default"))
    _run(_args(omniglot_dir, workdir))
    return workdir


def test_mirrored_on_two_logical_cpus_matches_default_and_resumes_under_default(
        omniglot_dir, default_run, tmp_path):
    # The compiled step under MirroredStrategy for 4 iterations, then the default strategy
    # resumes its checkpoint (without XLA: the checkpoint's layout is what moves between
    # strategies): the weights after 6 match the default run's, so both the mirrored steps
    # and the switch are right (one run fewer than checking them apart).
    workdir = str(tmp_path / "mirrored")
    _run(_args(omniglot_dir, workdir, iterations=4, strategy="mirrored", cpu_devices=2))
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert results["protocol"]["replicas"] == 2
    err = _run(_args(omniglot_dir, workdir, iterations=6, jit_compile="false"))
    assert "Resuming at iteration 4" in err
    _assert_same(_weights(default_run), _weights(workdir))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_local_workers_match_default(omniglot_dir, default_run, tmp_path):
    workdir = str(tmp_path / "multi")
    cluster = {"worker": [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]}
    # Without XLA (the mirrored test above covers the compiled step under a strategy): the
    # all-reduce across processes is what this checks, and each worker's compile took half
    # of its minute here.
    procs = [_launch(_args(omniglot_dir, workdir, strategy="multi_worker", jit_compile="false"),
                     {"TF_CONFIG": json.dumps({"cluster": cluster,
                                               "task": {"type": "worker", "index": i}})})
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    _assert_same(_weights(default_run), _weights(workdir))
    # The second worker kept its own copy out of the chief's way.
    assert os.path.isdir(os.path.join(workdir, "workers", "worker-1", "checkpoints"))


def test_tpu_without_a_tpu_fails_fast_and_clearly():
    t0 = time.time()
    with pytest.raises(ConfigError, match="--strategy=tpu found no TPU"):
        distribute.make_strategy(Config.from_dict({"strategy": "tpu"}))
    assert time.time() - t0 < 5


def test_a_meta_batch_the_replicas_do_not_divide_is_refused(monkeypatch):
    class Two:
        num_replicas_in_sync = 2
    monkeypatch.setattr(distribute.tf.distribute, "get_strategy", lambda: Two())
    with pytest.raises(ConfigError, match="--meta_batch_size=5 cannot be split evenly over the 2"):
        distribute.make_strategy(Config.from_dict({"meta_batch_size": 5}))
