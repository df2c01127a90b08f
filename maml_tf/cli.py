"""What the entry points share: an error that bad input or the environment causes becomes
one paragraph naming the problem and the fix, no traceback (``--verbosity=1`` shows it); a
run stopped by a signal exits with 128 + its number; ``--help`` lists the flags by section;
a group of runs (``--seeds``, ``maml_tf.sweep``) runs through ``maml_tf.grid``."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Sequence

from absl import flags as absl_flags

# Defines the absl flags: this module is imported by the entry points only.
from maml_tf import flags as maml_flags
from maml_tf import distribute, grid
from maml_tf.config import OWNER as C_OWNER, Config, ConfigError
from maml_tf.data.errors import DataError
from maml_tf.models.functional import InexactModelError
from maml_tf.harness import NonFiniteError
from maml_tf.stop_signals import RunInterrupted

# Most specific first: the checkpointing errors are ConfigErrors.
_KINDS = ((InexactModelError, "Model error"), (ConfigError, "Configuration error"),
          (DataError, "Data error"), (NonFiniteError, "Stopped"), (OSError, "File system error"))


def _stopped(code: int, leave_process: bool):
    """The exit of a run stopped by a signal. ``leave_process``: at once, without the
    interpreter's teardown. The stop was raised deep inside TensorFlow's calls, and the
    traceback keeps their objects (data iterators, writers) alive until the teardown destroys
    them in no fixed order, which crashed one process in a CI run (SIGSEGV after the
    checkpoint was saved). Everything of the run is written and closed by then."""
    if leave_process:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return SystemExit(code)


@contextlib.contextmanager
def user_errors(verbose: bool, leave_process: bool = False):
    """Turns the errors of ``_KINDS`` into ``SystemExit`` with one paragraph (re-raised as
    they are when ``verbose``) and ``RunInterrupted`` into its exit code (``leave_process``:
    the entry points leave at once then; see ``_stopped``)."""
    import tensorflow as tf   # the entry points have imported it already
    try:
        yield
    except RunInterrupted as e:
        print(e, file=sys.stderr)
        raise _stopped(e.exit_code, leave_process) from None
    except KeyboardInterrupt as e:
        # A second SIGINT / SIGTERM (stop_signals.StopSignals) or Ctrl-C before the handlers.
        if verbose:
            raise
        print(f"Stopped at once ({e or 'interrupted'}), without a checkpoint of the iteration in "
              "progress: the latest checkpoint is intact, and the same command resumes from it.",
              file=sys.stderr)
        raise _stopped(130, leave_process) from None
    except tf.errors.ResourceExhaustedError as e:
        if verbose:
            raise
        raise SystemExit(
            f"Out of resources: {e.message.strip().splitlines()[0][:300]}. If a disk is full, free "
            "space and run the same command: a checkpoint cut short is never the one resumed "
            "from (the previous one is kept). If memory ran out, lower --meta_batch_size or "
            "use --task_chunks / --inner_recompute. (--verbosity=1 shows the traceback)") from None
    except tf.errors.OpError as e:
        lost = distribute.lost_worker(e)
        if lost is None or verbose:
            raise
        print(lost, file=sys.stderr)
        raise SystemExit(distribute.LOST_WORKER_EXIT) from None
    except tuple(k for k, _ in _KINDS) as e:
        if verbose:
            raise
        kind = next(name for k, name in _KINDS if isinstance(e, k))
        raise SystemExit(f"{kind}: {e} (--verbosity=1 shows the traceback)") from None


def supervised_worker(argv: Sequence[str]) -> int:
    """Runs this multi-worker command (``argv``) as a child process and returns its exit
    code, so that the worker honours SIGTERM while it waits for its peers to start: there
    TensorFlow's coordination agent takes SIGTERM over and holds Python's lock, so the
    worker itself cannot act on it. Before the child reports the cluster started
    (``distribute.STARTED_FD``), a stop signal kills it at once (nothing is written yet);
    afterwards the signal is passed on and the run stops with a checkpoint as usual."""
    import signal
    import subprocess
    import threading
    read_end, write_end = os.pipe()
    child = subprocess.Popen([sys.executable, "-m", *argv],
                             env={**os.environ, distribute.STARTED_FD: str(write_end)},
                             pass_fds=(write_end,), preexec_fn=die_with_parent,
                             # A session of its own: a terminal's Ctrl-C reaches the child
                             # once, passed on by on_signal, not twice.
                             start_new_session=True)
    os.close(write_end)
    started = threading.Event()

    def wait_for_start():
        if os.read(read_end, 1):   # empty: the child ended first
            started.set()
    threading.Thread(target=wait_for_start, daemon=True).start()
    stopped: list[int] = []

    def on_signal(signum, frame):
        stopped.append(signum)
        if started.is_set():
            child.send_signal(signum)
        else:
            child.kill()
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped and not started.is_set():
        print(f"Stopped by {signal.Signals(stopped[0]).name} while waiting for the cluster's other "
              "workers to start (TF_CONFIG), before anything of the run was written; start all "
              "workers to run it (python -m maml_tf.launch starts a local cluster).", file=sys.stderr)
        return 128 + stopped[0]
    return 128 - code if code < 0 else code


def die_with_parent() -> None:
    """In a child process (Linux): SIGKILL when its parent dies, so that a supervised worker
    never outlives a supervisor killed with ``kill -9``."""
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 9)   # PR_SET_PDEATHSIG, SIGKILL


def no_positional(argv: Sequence[str]) -> None:
    """Exits with one line when the command line holds an argument that is not a flag (absl
    would print the whole --help before its refusal)."""
    if len(argv) > 1:
        extra = " ".join(repr(a) for a in argv[1:])
        raise SystemExit(f"Unexpected argument{'s' if len(argv) > 2 else ''} {extra}: every "
                         "setting is a flag, --name=value (quote a value with spaces; "
                         "--flagfile=PATH reads flags from a file). --help lists the flags.")


def argv(values: absl_flags.FlagValues, only: Sequence[str] | None = None) -> list[str]:
    """``sys.argv`` with every ``--flagfile`` expanded (paths relative to the flagfile that
    names them); an unreadable or circular flagfile exits with one line. ``--help`` (``-h``)
    prints the flags of ``values`` (the entry point's ``FLAGS``) by the config's sections and
    exits; only: the flags this entry point takes (None: all)."""
    if any(a in ("--help", "-h", "-?", "--helpshort") for a in sys.argv[1:]):
        main = sys.modules.get("__main__")
        print(maml_flags.sectioned_help(values, getattr(main, "__doc__", "") or "", only))
        raise SystemExit(0)
    try:
        return maml_flags.expand_flagfiles(sys.argv)
    except ConfigError as e:
        raise SystemExit(f"Configuration error: {e}") from None


def run_group(values: absl_flags.FlagValues, config: Config, root: str,
              axes: list[tuple[str, list[str]]], seeds: Sequence[str] | None,
              jobs: int) -> None:
    """Runs a grid (``axes``) times ``seeds`` of the command's flags (``values``, whose
    base ``config`` is valid) as child processes below ``root``, then exits with the group's
    code and one paragraph (``grid.summary``). Each grid point is checked before any run
    starts: an invalid one is reported as failed and the others run."""
    seed_list = grid.parse_seeds(seeds, config.seed) if seeds else None
    if jobs > (os.cpu_count() or 1):
        raise ConfigError(f"--jobs={jobs} exceeds the {os.cpu_count()} CPUs of this machine: "
                          "runs at once would share cores and each would run slower.")
    runs = grid.plan(axes, seed_list)

    # The grid's flags and (with --seeds) the seed are each run's own.
    exclude = tuple(k for k, _ in axes) + (("seed",) if seed_list else ())
    base = maml_flags.passed_flags(values, exclude=exclude)

    def check(run: grid.PlannedRun) -> None:
        # The run's flags as its child reads them: its flagfile, the command's, its own.
        args = maml_flags.expand_flagfiles([f"--flagfile={run.flagfile}"]) if run.flagfile else []
        changed = {}
        for arg in args + base + list(run.flags):
            name, sep, value = arg.lstrip("-").partition("=")
            if not sep:   # a boolean: --name or --noname
                name, value = (name, "true") if name in values else (name[2:], "false")
            if name not in C_OWNER:
                continue   # --overwrite and the like: not the run's config
            try:
                changed[name] = values[name].parser.parse(value)
            except ValueError as e:
                raise ConfigError(f"--{name}={value}: {e}") from None
        Config.from_dict(changed)
    record = {"command": list(sys.argv), "grid": dict(axes), "seeds": seed_list}
    info = grid.run_all(base, runs, root, jobs=max(1, jobs), record=record, check=check,
                        say=lambda line: print(line, flush=True))
    code, text = grid.summary(info, root)
    print(text, file=sys.stderr if code else sys.stdout)
    raise SystemExit(code)
