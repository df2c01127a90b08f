"""Robust runs: resume after kill -9 (bitwise), determinism, nothing written outside the workdir."""

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import tensorflow as tf

from maml_tf import train_loop
from maml_tf.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--dataset=sinusoid", "--shot=5", "--query=5", "--meta_batch_size=4",
        "--num_iterations=300", "--log_every=10", "--eval_every=100", "--checkpoint_every=10",
        "--eval_tasks=20", "--val_tasks=4", "--eval_inner_steps=2"]


def _train(workdir):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen([sys.executable, "-m", "maml_tf.train", f"--workdir={workdir}"] + ARGS,
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _final_weights(workdir):
    reader = tf.train.load_checkpoint(os.path.join(workdir, "checkpoints"))
    # Every saved tensor: the weights (under the optimizer's references) and Adam's slots.
    names = sorted(n for n in reader.get_variable_to_shape_map()
                   if n.startswith("optimizer/_") and "VARIABLE_VALUE" in n)
    assert any("_trainable_variables" in n for n in names), names
    return {n: reader.get_tensor(n) for n in names}, reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")


def test_kill_9_mid_run_then_resume_ends_bitwise_identical(tmp_path):
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    assert _train(straight).wait() == 0
    rng = random.Random(0)
    for attempt in range(2):   # kill twice, at random moments after a checkpoint exists
        proc = _train(killed)
        deadline = time.time() + 120
        while not glob.glob(os.path.join(killed, "checkpoints", "ckpt-*.index")):
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    resumed = _train(killed)
    _, err = resumed.communicate()
    assert resumed.returncode == 0, err.decode()[-2000:]
    assert "Resuming at iteration" in err.decode()
    (a, sa), (b, sb) = _final_weights(straight), _final_weights(killed)
    assert sa == sb == 300 and a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # The resumed run's results equal the uninterrupted run's.
    ra = json.load(open(os.path.join(straight, "results.json")))["test"]
    rb = json.load(open(os.path.join(killed, "results.json")))["test"]
    assert ra == rb


def test_same_seed_and_flags_give_the_same_metrics(tmp_path):
    config = Config.from_dict({"num_iterations": 6, "meta_batch_size": 3, "eval_tasks": 8,
                               "val_tasks": 2, "log_every": 3, "eval_every": 3,
                               "checkpoint_every": 3})
    a = train_loop.run(config, str(tmp_path / "a"))["test"]
    b = train_loop.run(config, str(tmp_path / "b"))["test"]
    assert a == b
    other = Config.from_dict({**config.to_dict(), "seed": 1})
    assert train_loop.run(other, str(tmp_path / "c"))["test"] != a


def test_training_writes_only_inside_its_workdir(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    config = Config.from_dict({"num_iterations": 2, "meta_batch_size": 2, "eval_tasks": 2,
                               "val_tasks": 2, "log_every": 1, "eval_every": 2,
                               "checkpoint_every": 2})
    train_loop.run(config, str(tmp_path / "work"))
    assert sorted(os.listdir(tmp_path)) == ["cwd", "work"] and not os.listdir(cwd)
