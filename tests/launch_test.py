"""Multi-worker runs on 127.0.0.1 through ``maml_tf.launch``: a lost worker ends the others
with the paragraph and exit code 75 and the launcher restarts the cluster to completion; a
SIGTERM stops every worker at one agreed iteration with its checkpoint, and the resumed run
ends bitwise equal to an uninterrupted one. Each test bounds its own time."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tests stop a worker once ckpt-100 exists; the 200 iterations after it (about 7 s here)
# leave time to do so before the run ends.
ITERATIONS = 300
RUN = ["--dataset=sinusoid", "--meta_batch_size=4", "--jit_compile=false", "--log_every=50",
       "--checkpoint_every=100", "--eval_every=100000", "--val_tasks=4", "--eval_tasks=4",
       f"--num_iterations={ITERATIONS}"]


def launch(workdir, *extra, max_restarts=2):
    return subprocess.Popen([sys.executable, "-m", "maml_tf.launch", "--workers=2",
                             f"--max_restarts={max_restarts}", "--", f"--workdir={workdir}",
                             *RUN, *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


def wait_for(path, proc, timeout=240):
    t0 = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() - t0 < timeout, f"{path} did not appear"
        time.sleep(0.5)


def worker_pid(workdir, index):
    """The TensorFlow process of worker ``index`` of the run in ``workdir`` (from /proc; not
    its supervising parent, cli.supervised_worker)."""
    for env_path in glob.glob("/proc/[0-9]*/environ"):
        try:
            cmd = open(env_path.replace("environ", "cmdline"), "rb").read()
            env = open(env_path, "rb").read()
        except OSError:
            continue
        if f"--workdir={workdir}".encode() in cmd and b"maml_tf.train" in cmd and \
                f'"index": {index}'.encode() in env and b"MAML_TF_STARTED_FD" in env:
            return int(env_path.split("/")[2])
    raise AssertionError(f"worker {index} not found")


def finish(proc, timeout=400):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, out


def weights(workdir, step):
    reader = tf.train.load_checkpoint(os.path.join(workdir, "checkpoints", f"ckpt-{step}"))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if k.startswith("optimizer/_trainable_variables")}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted two-worker run (the reference both tests end bitwise equal to)."""
    workdir = str(tmp_path_factory.mktemp("straight"))
    code, out = finish(launch(workdir))
    assert code == 0, out[-4000:]
    # A normal end: both workers exit 0, with no crash message.
    assert "crashed" not in out and "Traceback" not in out, out[-4000:]
    return workdir


# Not `isolated`: this process only reads checkpoints; the launched workers train.
def test_a_lost_worker_stops_the_other_and_the_launcher_restarts_the_cluster(straight, tmp_path):
    workdir = str(tmp_path / "run")
    proc = launch(workdir)
    wait_for(os.path.join(workdir, "checkpoints", "ckpt-100.index"), proc)
    os.kill(worker_pid(workdir, 1), signal.SIGKILL)
    code, out = finish(proc)
    assert code == 0, out[-4000:]
    assert "[worker 0] Lost worker 1 of the multi-worker cluster" in out
    assert "exit code 75" in out and "Restarting the cluster (1 of 2)" in out
    assert "Traceback" not in out
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert results["protocol"]["checkpoint_step"] == ITERATIONS
    sessions = json.load(open(os.path.join(workdir, "sessions.json")))
    assert len(sessions) == 2 and sessions[1]["from_iteration"] >= 100
    # TensorBoard on the workdir sees the run once: worker 1 writes its checkpoints only.
    events = glob.glob(os.path.join(workdir, "**", "events.out.tfevents*"), recursive=True)
    assert events and not [e for e in events if "/workers/" in e]
    assert glob.glob(os.path.join(workdir, "workers", "worker-1", "checkpoints", "ckpt-*"))
    # Resumed from the checkpoint before the kill, the run ends bitwise as an uninterrupted one.
    a, b = weights(straight, ITERATIONS), weights(workdir, ITERATIONS)
    assert a.keys() == b.keys() and a
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_sigterm_stops_every_worker_at_one_checkpoint_and_the_resume_is_bitwise(straight,
                                                                                 tmp_path):
    stopped = str(tmp_path / "stopped")
    proc = launch(stopped)
    wait_for(os.path.join(stopped, "checkpoints", "ckpt-100.index"), proc)
    os.kill(worker_pid(stopped, 1), signal.SIGTERM)   # one worker preempted
    time.sleep(0.1)
    code, out = finish(proc)
    lines = [line for line in out.splitlines() if "Stopped by SIGTERM after iteration" in line]
    assert {line[:11] for line in lines} == {"[worker 0] ", "[worker 1] "}, out[-4000:]
    steps = {line.split("iteration ")[1].split(":")[0] for line in lines}
    assert len(steps) == 1   # one agreed iteration
    # The restarted cluster resumed from that checkpoint.
    sessions = json.load(open(os.path.join(stopped, "sessions.json")))
    assert [s["from_iteration"] for s in sessions] == [0, int(steps.pop())]
    # A preempted worker is restarted like a lost one, and the run finishes.
    assert code == 0 and "Restarting the cluster (1 of 2)" in out, out[-4000:]
    a, b = weights(straight, ITERATIONS), weights(stopped, ITERATIONS)
    assert a.keys() == b.keys() and a
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_a_worker_waiting_for_a_missing_peer_ends_on_sigterm(tmp_path):
    import socket
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    workdir = str(tmp_path / "run")
    config = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
              "task": {"type": "worker", "index": 0}}
    proc = subprocess.Popen([sys.executable, "-m", "maml_tf.train", f"--workdir={workdir}", *RUN,
                             "--strategy=multi_worker"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TF_CONFIG": json.dumps(config)})
    t0 = time.time()
    while time.time() - t0 < 120:   # until TensorFlow's start-up waits for worker 1
        try:
            worker_pid(workdir, 0)
            break
        except AssertionError:
            time.sleep(0.5)
    time.sleep(10)
    proc.send_signal(signal.SIGTERM)
    t1 = time.time()
    code, out = finish(proc, timeout=30)
    assert time.time() - t1 < 30
    assert code == 143 and "while waiting for the cluster's other workers to start" in out, out
    assert not os.path.exists(os.path.join(workdir, "config.json"))
