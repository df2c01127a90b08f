"""The workdir: its lock, checkpoints (restore-or-init with fallback), config.json /
flags.cfg, atomic JSON."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import logging as std_logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time

import tensorflow as tf
from absl import logging

from maml_tf.config import Config, ConfigError, flatten_config, resolved_rotations

# Keys that may change when a run is resumed (a longer schedule, more logging).
RESUMABLE_KEYS = {"num_iterations", "log_every", "eval_every", "stop_when_flat", "checkpoint_every",
                  "eval_tasks", "on_nan", "strategy", "tpu", "jit_compile", "data_dir",
                  "data_source", "inner_recompute", "cpu_devices", "task_chunks",
                  "eval_mode", "eval_queries", "eval_trajectories", "eval_later_inner_lr",
                  "step_metrics_every", "cache_dir",
                  "eval_dataset", "eval_data_dir", "eval_split_file"}


LOCK_NAME = ".lock"


def _not_saver_noise(record: std_logging.LogRecord) -> bool:
    # TensorFlow's saver logs "Sharding callback duration: N microseconds" at INFO on every
    # checkpoint, which says nothing to a user and buries the run's own lines.
    return not record.getMessage().startswith("Sharding callback duration")


logging.get_absl_logger().addFilter(_not_saver_noise)   # TF's saver logs through absl


class WorkdirBusyError(ConfigError):
    """Another live process owns the workdir."""


class CheckpointError(ConfigError):
    """No checkpoint of the workdir can be loaded."""


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Makes this process the workdir's one owner while the context lasts.

    An ``fcntl`` lock on ``<workdir>/.lock``: the kernel releases it when the process ends,
    however it ends (``kill -9`` included), so a dead run never leaves it stuck. The file
    names the owner, for the message another process gets.
    """
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        with open(path) as f:
            owner = f.read().strip() or "a process that did not say which"
        os.close(fd)
        raise WorkdirBusyError(
            f"--workdir={workdir} is in use by another run ({owner}). Two runs on one workdir "
            "would corrupt it, and --overwrite never touches a workdir in use: wait for that "
            "run to end (or stop it), or use another --workdir.") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, (f"pid {os.getpid()} on {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)}\n").encode())
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    """Writes via a temporary file and ``os.replace``: a reader sees old or new, never half."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    # mkstemp creates 0600: give the file the permissions the user's umask gives any file,
    # so collaborators can read the run's config and results.
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def temporary_files_in(workdir: str):
    """Within: Python's temporary files (TF autograph's generated code among them) go to
    ``<workdir>/.tmp``, whose leftovers from a killed run are removed first."""
    path = os.path.join(workdir, ".tmp")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    for leftover in glob.glob(os.path.join(workdir, ".tmp-*")):   # atomic writes cut short
        os.remove(leftover)
    previous, tempfile.tempdir = tempfile.tempdir, path
    try:
        yield
    finally:
        tempfile.tempdir = previous


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


SESSIONS_NAME = "sessions.json"


class TrainingSession:
    """This training session's entry of ``sessions.json``: first and last iteration and wall
    seconds. ``record()`` writes it (after each checkpoint, and when the session ends), so a
    session killed with ``kill -9`` keeps its time up to its last checkpoint."""

    def __init__(self, workdir: str, start: int):
        self.path = os.path.join(workdir, SESSIONS_NAME)
        self.start, self.to_iteration = start, start
        self.entry: dict = {"from_iteration": start, "to_iteration": start,
                            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self._previous = read_sessions(workdir)
        self._t0 = time.time()

    def record(self) -> None:
        if self.to_iteration <= self.start:
            return
        self.entry.update(to_iteration=self.to_iteration,
                          seconds=round(time.time() - self._t0, 1))
        try:
            atomic_write_json(self.path, self._previous + [self.entry])
        except OSError as e:
            # Never hides why the session ended, nor stops a finished run: the
            # checkpoints hold the work; only the time record is lost.
            logging.warning("Could not record this training session in %s (%s).", self.path, e)


@contextlib.contextmanager
def training_session(workdir: str, start: int):
    """Records this training session in ``<workdir>/sessions.json`` when it ends, however it
    ends (finished, interrupted, failed), and at each ``record()`` (the loop calls it after
    every checkpoint). A run resumed over several sessions reports the sum as its training
    time (``training_time``).

    Yields the ``TrainingSession``, whose ``to_iteration`` the loop sets after each completed
    iteration.
    """
    session = TrainingSession(workdir, start)
    try:
        yield session
    finally:
        session.record()


def read_sessions(workdir: str) -> list[dict]:
    """The training sessions recorded in ``workdir`` (empty if none or unreadable)."""
    try:
        with open(os.path.join(workdir, SESSIONS_NAME)) as f:
            sessions = json.load(f)
        return sessions if isinstance(sessions, list) else []
    except (OSError, ValueError):
        return []


def training_time(workdir: str) -> dict:
    """Total training wall time of the run in ``workdir`` over all its sessions:
    ``{"seconds": float, "sessions": int}`` (iterations redone after a resume are counted as
    often as they ran: this is the time spent, not the time of one clean pass)."""
    sessions = read_sessions(workdir)
    return {"seconds": round(sum(float(s.get("seconds", 0.0)) for s in sessions), 1),
            "sessions": len(sessions)}


def prepare_workdir(workdir: str, config: Config, overwrite: bool = False) -> None:
    """Creates the workdir, or checks that it holds the same experiment.

    A workdir with different flags is refused, naming the differences; with
    ``overwrite`` its contents are moved aside to ``replaced-<time>/`` (never deleted). A
    workdir whose run stopped in its checks before any iteration (a config.json and no
    checkpoint, session, validation or result) takes the corrected flags: nothing is lost.
    """
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            # Keys added to Config after the run was written, or left out of its sections
            # as not applying to it, take their defaults; a flat config.json (written before
            # the sections) compares the same way.
            old = resolved_rotations({**Config().to_flat_dict(), **flatten_config(json.load(f))})
        new = resolved_rotations(config.to_flat_dict())
        diff = sorted(k for k in set(old) | set(new)
                      if k not in RESUMABLE_KEYS and old.get(k) != new.get(k))
        if diff and _never_trained(workdir):
            logging.info("%s held the config of a run that never trained (it stopped in its "
                         "checks): replaced by this one.", workdir)
            diff = []
        if diff and not overwrite:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
            raise ConfigError(
                f"--workdir={workdir} holds a run with different flags ({details}). Use a new "
                "--workdir, re-run with its own flags (--flagfile=<workdir>/flags.cfg), or pass "
                "--overwrite to move the old run aside into <workdir>/replaced-<time>/.")
        if diff:
            aside = os.path.join(workdir, time.strftime("replaced-%Y%m%d-%H%M%S"))
            os.makedirs(aside)
            for name in os.listdir(workdir):
                if not name.startswith("replaced-") and name not in (LOCK_NAME, ".tmp"):
                    shutil.move(os.path.join(workdir, name), aside)
    atomic_write_text(path, config.to_json() + "\n")
    atomic_write_text(os.path.join(workdir, "flags.cfg"),
                      f"# Re-runs (or resumes) this experiment:\n"
                      f"#   python -m maml_tf.train --flagfile={os.path.join(workdir, 'flags.cfg')}\n"
                      f"--workdir={workdir}\n" + config.to_flagfile())


def _never_trained(workdir: str) -> bool:
    """Whether ``workdir`` holds nothing a run produces: no checkpoint, no session, no
    validation, no result (only the config of a run that stopped before iteration 1)."""
    produced = (glob.glob(os.path.join(workdir, "checkpoints", "ckpt-*")) +
                glob.glob(os.path.join(workdir, "results*.json")) +
                [p for p in (os.path.join(workdir, SESSIONS_NAME),
                             os.path.join(workdir, "history.json")) if os.path.exists(p)])
    return not produced


def _number(path: str) -> int:
    return int(path.rsplit("-", 1)[-1])


def _candidates(directory: str) -> list[str]:
    """Every checkpoint of ``directory``, newest first: those the ``checkpoint`` index lists
    and any ``ckpt-N.index`` on disk (the index may be missing or garbled)."""
    found = {p[:-len(".index")] for p in glob.glob(os.path.join(directory, "ckpt-*.index"))
             if re.fullmatch(r"ckpt-\d+", os.path.basename(p)[:-len(".index")])}
    try:
        state = tf.train.get_checkpoint_state(directory)
    except Exception:   # noqa: BLE001 -- a garbled index is handled like a missing one
        state = None
    if state is not None:
        found.update(os.path.join(directory, os.path.basename(p))
                     for p in state.all_model_checkpoint_paths)
    return sorted(found, key=_number, reverse=True)


def _clean_leftovers(directory: str) -> None:
    """Temporary files of a save that a kill interrupted (the previous checkpoint is intact)."""
    for path in glob.glob(os.path.join(directory, "*_temp*")) + glob.glob(
            os.path.join(directory, "checkpoint.tmp*")):
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


def make_manager(checkpoint: tf.train.Checkpoint, directory: str,
                 max_to_keep: int = 3) -> tf.train.CheckpointManager:
    """A ``CheckpointManager`` whose latest checkpoint loads.

    Checkpoints are tried newest first (each restore is checked: TF verifies every tensor's
    checksum); one that fails is moved to ``<directory>/damaged/`` with a warning that says
    why, and the ``checkpoint`` index is rewritten to the newest one that loads (also when
    the index was missing or garbled). If none loads, ``CheckpointError`` says so.
    """
    os.makedirs(directory, exist_ok=True)
    _clean_leftovers(directory)
    candidates = _candidates(directory)
    damaged, good = [], None
    for path in candidates:
        try:
            checkpoint.restore(path).assert_existing_objects_matched()
            good = path
            break
        except Exception as e:   # noqa: BLE001 -- any failure means: this one cannot be used
            damaged.append((path, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"))
    if candidates and good is None:
        details = "; ".join(f"{os.path.basename(p)} ({why})" for p, why in damaged)
        raise CheckpointError(
            f"No checkpoint in {directory} can be loaded: {details}. Nothing was changed. "
            "Restore the checkpoints from a backup, or move the folder away to start this run "
            "again from iteration 0.")
    for path, why in damaged:
        aside = os.path.join(directory, "damaged")
        os.makedirs(aside, exist_ok=True)
        for f in glob.glob(path + ".*"):
            shutil.move(f, os.path.join(aside, os.path.basename(f)))
        logging.warning("Skipped checkpoint %s: it cannot be loaded (%s); moved to %s/.",
                        os.path.basename(path), why, aside)
    if good is not None:
        try:
            state = tf.train.get_checkpoint_state(directory)
        except Exception:   # noqa: BLE001
            state = None
        # An index that names its checkpoints by absolute paths (written by earlier versions
        # after a rebuild) breaks once the workdir is moved: it is rewritten with file names.
        absolute = state is not None and _index_has_absolute_paths(directory)
        if damaged or absolute or state is None or \
                os.path.basename(state.model_checkpoint_path) != os.path.basename(good):
            kept = sorted((p for p in candidates if _number(p) <= _number(good)), key=_number)
            _write_index(directory, good, kept)
            logging.warning("The checkpoint index of %s was %s; it now names %s.", directory,
                            "missing or unreadable" if state is None else
                            "written with absolute paths" if absolute and not damaged else
                            "out of date", os.path.basename(good))
    return tf.train.CheckpointManager(checkpoint, directory, max_to_keep=max_to_keep)


def _index_has_absolute_paths(directory: str) -> bool:
    """Whether the ``checkpoint`` index file itself names a checkpoint by an absolute path.
    (``tf.train.get_checkpoint_state`` joins every relative name to ``directory``, so its
    answer cannot tell.)"""
    try:
        with open(os.path.join(directory, "checkpoint")) as f:
            text = f.read()
    except OSError:
        return False
    return any(os.path.isabs(path) for path in
               re.findall(r'^\s*(?:all_)?model_checkpoint_paths?:\s*"(.*)"\s*$', text, re.M))


def _write_index(directory: str, latest: str, kept: list[str]) -> None:
    """The ``checkpoint`` index naming ``kept`` (oldest first) by file name, so that the
    workdir can move, with their times, so that the manager deletes all but the newest
    ``max_to_keep`` at its next save (it forgets checkpoints listed without a time)."""
    tf.compat.v1.train.update_checkpoint_state(
        directory, os.path.basename(latest),
        all_model_checkpoint_paths=[os.path.basename(p) for p in kept],
        all_model_checkpoint_timestamps=[os.path.getmtime(p + ".index") for p in kept])


def restore_or_init(manager: tf.train.CheckpointManager) -> int | None:
    """Restores the latest checkpoint if there is one; returns its step or None."""
    latest = manager.latest_checkpoint
    if latest is None:
        return None
    manager.checkpoint.restore(latest).assert_existing_objects_matched()
    return int(latest.rsplit("-", 1)[-1])


def restore_for_reading(checkpoint: tf.train.Checkpoint, directory: str,
                        number: int | None = None) -> int:
    """Restores ``ckpt-<number>`` of ``directory`` (default: the newest that loads) into
    ``checkpoint`` and returns its number, changing nothing on disk: a checkpoint that fails
    to load is skipped with a warning (``make_manager`` moves it aside when the run resumes).
    Raises ``CheckpointError`` when none (or not the named one) loads."""
    candidates = _candidates(directory) if os.path.isdir(directory) else []
    if not candidates:
        raise CheckpointError(f"No checkpoint in {directory}: the run has not saved one yet "
                              "(it saves every --checkpoint_every iterations and when stopped).")
    if number is not None:
        named = [p for p in candidates if _number(p) == number]
        if not named:
            raise CheckpointError(f"{directory} has no checkpoint ckpt-{number}; it has "
                                  f"{', '.join(os.path.basename(p) for p in candidates)}.")
        candidates = named
    failures = []
    for path in candidates:
        try:
            checkpoint.restore(path).expect_partial().assert_existing_objects_matched()
        except Exception as e:   # noqa: BLE001 -- any failure means: this one cannot be used
            failures.append(f"{os.path.basename(path)} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''})")
            continue
        for why in failures:
            logging.warning("Skipped checkpoint %s: it cannot be loaded.", why)
        return _number(path)
    raise CheckpointError(f"No checkpoint in {directory} can be loaded: {'; '.join(failures)}. "
                          "Nothing was changed. Restore the checkpoints from a backup.")
