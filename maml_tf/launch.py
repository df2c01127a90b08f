"""Runs a multi-worker training on this machine, and restarts it after a failure; kept short.

    python -m maml_tf.launch --workers=2 [--max_restarts=3] -- --flagfile=runs/sinusoid.cfg \\
        --workdir=$HOME/maml_runs/sinusoid_2w

Picks free 127.0.0.1 ports, gives each worker its TF_CONFIG, starts ``python -m
maml_tf.train <flags> --strategy=multi_worker`` once per worker and prefixes their output
with ``[worker K]``. When a worker is lost (exit code 75, see ``maml_tf/distribute.py``) or
preempted (killed, or stopped by a signal that was not sent to this launcher), the launcher
stops the others and restarts the whole cluster, which resumes from the last checkpoint, up
to --max_restarts times: what Kubernetes or Slurm do on a real cluster. SIGTERM or SIGINT to
the launcher is passed to every worker, which then agree on one checkpoint and exit.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags

from maml_tf import cli, distribute
from maml_tf import flags as maml_flags

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(maml_flags)

# A worker that does not end within this many seconds of SIGTERM is killed (one waiting for
# a peer in TensorFlow's start-up ignores SIGTERM).
GRACE_SECONDS = 30


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start(workers: int, args: list[str]) -> list[subprocess.Popen]:
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(workers)]}
    procs = []
    for k in range(workers):
        env = {**os.environ, "TF_CONFIG": json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": k}})}
        # Each worker in a session of its own (a terminal's Ctrl-C reaches it once, as the
        # launcher's SIGTERM), dying with the launcher.
        proc = subprocess.Popen([sys.executable, "-m", "maml_tf.train", *args,
                                 "--strategy=multi_worker"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1,
                                start_new_session=True, preexec_fn=cli.die_with_parent)
        threading.Thread(target=_relay, args=(proc, f"[worker {k}] "), daemon=True).start()
        procs.append(proc)
    return procs


def _relay(proc: subprocess.Popen, prefix: str) -> None:
    assert proc.stdout is not None   # started with stdout=PIPE
    for line in proc.stdout:
        sys.stdout.write(prefix + line)
        sys.stdout.flush()


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to every running worker, SIGKILL to those still running after the grace."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + GRACE_SECONDS
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _restartable(code: int) -> bool:
    """A lost worker, or a worker killed or stopped by a signal (preemption)."""
    return code == distribute.LOST_WORKER_EXIT or code < 0 or code >= 128


def run(workers: int, max_restarts: int, args: list[str], say=print) -> int:
    """Runs the cluster until every worker ends with 0, a worker fails in a way a restart
    cannot mend, or the restarts are used up; returns the exit code for the launcher."""
    stopping: list[int] = []

    def on_signal(signum, frame):
        stopping.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    for attempt in range(max_restarts + 1):
        procs = _start(workers, args)
        # Until all have ended, or one has failed (the others may then wait for it forever).
        while any(p.poll() is None for p in procs) and all(p.poll() in (None, 0) for p in procs):
            time.sleep(0.5)
        if any(p.poll() not in (None, 0) for p in procs):   # the others may wait for it
            _stop(procs)
        codes = [p.wait() for p in procs]
        if stopping:
            say(f"Stopped by {signal.Signals(stopping[0]).name}: the workers saved one checkpoint "
                "of their last iteration; the same command resumes.")
            return 128 + stopping[0]
        if all(c == 0 for c in codes):
            return 0
        failed = [f"worker {k} (exit {c})" for k, c in enumerate(codes) if c != 0]
        if not any(_restartable(c) for c in codes):
            say(f"The cluster failed: {', '.join(failed)}; a restart would not mend it (see the "
                "workers' messages above).")
            return max(codes)
        if attempt < max_restarts:
            say(f"Restarting the cluster ({attempt + 1} of {max_restarts}) after "
                f"{', '.join(failed)}: it resumes from the last checkpoint.")
    say(f"The cluster failed {max_restarts + 1} times; giving up (raise --max_restarts to "
        "try more often).")
    return distribute.LOST_WORKER_EXIT


def main(argv):
    args = argv[1:]
    if not any(a.startswith(("--workdir", "--flagfile")) for a in args):
        raise SystemExit("Give the training flags after --: python -m maml_tf.launch --workers=2 "
                         "-- --flagfile=runs/X.cfg --workdir=W")
    if any(a.startswith("--strategy") for a in args):
        raise SystemExit("Leave --strategy out: the launcher runs every worker with "
                         "--strategy=multi_worker.")
    if FLAGS.workers < 1 or FLAGS.max_restarts < 0:
        raise SystemExit("--workers must be at least 1 and --max_restarts at least 0.")
    raise SystemExit(run(FLAGS.workers, FLAGS.max_restarts, args))


if __name__ == "__main__":
    app.run(main, argv=cli.argv(FLAGS, only=maml_flags.LAUNCH_FLAGS))
