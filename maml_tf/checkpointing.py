"""The workdir: checkpoints (restore-or-init), config.json / flags.cfg, atomic JSON."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import tensorflow as tf

from maml_tf.config import Config, ConfigError

# Keys that may change when a run is resumed (a longer schedule, more logging).
RESUMABLE_KEYS = {"num_iterations", "log_every", "eval_every", "checkpoint_every",
                  "eval_tasks", "on_nan", "strategy", "tpu", "jit_compile", "data_dir",
                  "data_source", "inner_recompute", "cpu_devices", "task_chunks"}


def atomic_write_text(path: str, text: str) -> None:
    """Writes via a temporary file and ``os.replace``: a reader sees old or new, never half."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def prepare_workdir(workdir: str, config: Config, overwrite: bool = False) -> None:
    """Creates the workdir, or checks that it holds the same experiment.

    A workdir with different flags is refused, naming the differences; with
    ``overwrite`` its contents are moved aside to ``replaced-<time>/`` (never deleted).
    """
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            # Keys added to Config after the run was written take their defaults.
            old = {**Config().to_dict(), **json.load(f)}
        new = config.to_dict()
        diff = sorted(k for k in set(old) | set(new)
                      if k not in RESUMABLE_KEYS and old.get(k) != new.get(k))
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
                if not name.startswith("replaced-"):
                    shutil.move(os.path.join(workdir, name), aside)
    atomic_write_text(path, config.to_json() + "\n")
    atomic_write_text(os.path.join(workdir, "flags.cfg"),
                      f"# Re-runs (or resumes) this experiment:\n"
                      f"#   python -m maml_tf.train --flagfile={os.path.join(workdir, 'flags.cfg')}\n"
                      f"--workdir={workdir}\n" + config.to_flagfile())


def restore_or_init(manager: tf.train.CheckpointManager) -> int | None:
    """Restores the latest checkpoint if there is one; returns its step or None."""
    latest = manager.latest_checkpoint
    if latest is None:
        return None
    manager.checkpoint.restore(latest).assert_existing_objects_matched()
    return int(latest.rsplit("-", 1)[-1])
