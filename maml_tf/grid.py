"""Many training runs of one experiment: a grid of flag values times seeds, each run a
``python -m maml_tf.train`` child process in a workdir of its own.

``plan(grid, seeds)`` names the runs (``<key>=<value>,.../seed-<K>``); ``run_all`` runs them
one at a time (or ``jobs`` at once), skips a run whose workdir holds its final results,
resumes one that stopped (the child is the same command, and training resumes from its
workdir), reports a run that fails and goes on with the others. SIGTERM or SIGINT stops
the running children (each saves a checkpoint of its last iteration) and starts no new one:
the same command later goes on where it stopped. ``<root>/runs.json`` records the command,
the grid, the seeds and each run's state, so a group of runs is one directory that
``python -m maml_tf.report`` reads (runs that differ only by seed are one row).
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from typing import Callable, Sequence

from maml_tf import checkpointing
from maml_tf.config import OWNER, ConfigError

RECORD = "runs.json"


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One run of a grid: its workdir below the root and the flags it adds."""
    name: str                 # e.g. "algorithm=maml,inner_lr=0.1/seed-0"
    flags: tuple[str, ...]    # e.g. ("--algorithm=maml", "--inner_lr=0.1", "--seed=0")
    flagfile: str | None = None   # a ``flagfile`` axis: read before the command's flags


def parse_grid(specs: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``["algorithm=maml,protonet", "inner_lr=0.1,0.4"]`` -> ``[(key, values), ...]``.

    The axis ``flagfile`` gives each grid point a flagfile of its own (values may be glob
    patterns: ``--grid=flagfile=runs/family/*.cfg``), read before the command's other flags,
    which therefore override it."""
    axes: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not values.strip():
            raise ConfigError(f"--grid={spec!r} is not key=value1,value2,...: for example "
                              "--grid=algorithm=maml,protonet.")
        if key == "flagfile":
            paths = [p for v in values.split(",") for p in sorted(glob.glob(v.strip()))
                     or [v.strip()]]
            missing = [p for p in paths if not os.path.isfile(p)]
            if missing:
                raise ConfigError(f"--grid={spec!r}: no flagfile {missing[0]}.")
            axes.append((key, [os.path.abspath(p) for p in paths]))
            continue
        if key not in OWNER:
            close = difflib.get_close_matches(key, list(OWNER) + ["flagfile"], n=1)
            raise ConfigError(f"--grid={spec!r}: {key!r} is not a flag of a run"
                              + (f"; did you mean {close[0]!r}?" if close else "."))
        if key in ("seed", "eval_shots"):
            raise ConfigError(f"--grid={spec!r}: " + ("seeds are --seeds=N or --seeds=0,1,2."
                              if key == "seed" else "a list-valued flag cannot be a grid axis "
                              "(its values are comma-separated too): run one sweep per value."))
        if any(key == k for k, _ in axes):
            raise ConfigError(f"--grid names {key!r} twice: give all its values in one --grid.")
        listed = [v.strip() for v in values.split(",")]
        if len(set(listed)) != len(listed) or "" in listed:
            raise ConfigError(f"--grid={spec!r}: each value once, none empty (two runs would "
                              "share a workdir).")
        axes.append((key, listed))
    return axes


def parse_seeds(values: Sequence[str], first: int = 0) -> list[int]:
    """``--seeds``: one number N is N seeds from ``first`` (``--seed``); two or more numbers
    are the seeds themselves."""
    try:
        numbers = [int(v) for v in values]
    except ValueError:
        raise ConfigError(f"--seeds={','.join(values)} is not a count (--seeds=3) or a list "
                          "of seeds (--seeds=0,1,2).") from None
    if len(numbers) == 1:
        if numbers[0] < 1:
            raise ConfigError(f"--seeds={numbers[0]}: the number of seeds must be >= 1.")
        return list(range(first, first + numbers[0]))
    if len(set(numbers)) != len(numbers) or min(numbers) < 0:
        raise ConfigError(f"--seeds={','.join(values)}: seeds must be distinct and >= 0.")
    return numbers


def plan(axes: list[tuple[str, list[str]]], seeds: Sequence[int] | None) -> list[PlannedRun]:
    """The runs of the grid ``axes`` (their product, in order) times ``seeds`` (None: each
    point once, at the command's own seed)."""
    runs = []
    for values in itertools.product(*[v for _, v in axes]):
        chosen = list(zip([k for k, _ in axes], values))
        # A flagfile is named by its file name without .cfg.
        point = ",".join(f"{k}={os.path.splitext(os.path.basename(v))[0] if k == 'flagfile' else v}"
                         for k, v in chosen)
        flags = tuple(f"--{k}={v}" for k, v in chosen if k != "flagfile")
        flagfile = next((v for k, v in chosen if k == "flagfile"), None)
        for seed in (seeds if seeds is not None else [None]):
            parts = [p for p in (point, None if seed is None else f"seed-{seed}") if p]
            runs.append(PlannedRun("/".join(parts) or ".",
                                   flags + (() if seed is None else (f"--seed={seed}",)),
                                   flagfile))
    return runs


def finished(workdir: str) -> bool:
    """Whether the run in ``workdir`` has trained all its iterations, or as many as its
    ``--stop_when_flat`` rule let it, and written results."""
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            stored = json.load(f)
        iterations = stored.get("optim", stored).get("num_iterations")
        rule = stored.get("evaluation", stored).get("stop_when_flat", 0)
        with open(os.path.join(workdir, "results.json")) as f:
            results = json.load(f)
        stopped = results.get("stopped_when_flat") or {}
        return results["protocol"]["checkpoint_step"] == iterations or \
            (bool(rule) and stopped.get("stop_when_flat") == rule)
    except (OSError, ValueError, KeyError, AttributeError):
        return False


class _Stop:
    """SIGTERM / SIGINT: stop the children (they checkpoint) and start no new run."""

    def __enter__(self) -> "_Stop":
        self.signum: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM,
                                                                     signal.SIGINT)}
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False


def run_all(base: Sequence[str], runs: list[PlannedRun], root: str, jobs: int = 1,
            record: dict | None = None, say: Callable[[str], None] = print,
            command: Sequence[str] | None = None,
            check: Callable[[PlannedRun], None] | None = None) -> dict:
    """Runs ``runs`` below ``root`` as ``python -m maml_tf.train [--flagfile=run.flagfile]
    *base *run.flags --workdir=<root>/<run.name>`` (``command`` replaces ``python -m maml_tf.train``), at
    most ``jobs`` at once; returns (and keeps in ``<root>/runs.json``) the record with each
    run's state: finished, skipped (finished before), failed (its exit code and the last
    line it printed, or the ``ConfigError`` that ``check`` raised before starting it) or
    stopped. Output of each child goes to ``<root>/logs/<name>.log``."""
    command = list(command or [sys.executable, "-m", "maml_tf.train"])
    os.makedirs(os.path.join(root, "logs"), exist_ok=True)
    path = os.path.join(root, RECORD)
    states: dict[str, dict] = {}
    info = {**(record or {}), "runs": states}
    pending = []
    for run in runs:
        try:
            if check is not None:
                check(run)
        except ConfigError as e:
            states[run.name] = {"state": "failed", "error": str(e)}
            say(f"{run.name}: failed before it started: {e}")
            continue
        if finished(os.path.join(root, run.name)):
            states[run.name] = {"state": "skipped: finished before"}
            say(f"{run.name}: finished before, skipped")
        else:
            pending.append(run)
    checkpointing.atomic_write_json(path, info)
    active: dict[str, tuple[subprocess.Popen, float, str]] = {}
    signalled: set[str] = set()
    started, total = 0, len(pending)
    with _Stop() as stop:
        while pending or active:
            while pending and len(active) < jobs and stop.signum is None:
                run = pending.pop(0)
                log = os.path.join(root, "logs", run.name.replace("/", "__") + ".log")
                workdir = os.path.join(root, run.name)
                first = [f"--flagfile={run.flagfile}"] if run.flagfile else []
                with open(log, "ab") as out:
                    child = subprocess.Popen(command + first + list(base) + list(run.flags) +
                                             [f"--workdir={workdir}"], stdout=out,
                                             stderr=subprocess.STDOUT, start_new_session=True)
                active[run.name] = (child, time.time(), log)
                states[run.name] = {"state": "running", "log": os.path.relpath(log, root)}
                started += 1
                say(f"[{started}/{total}] {run.name}: started (log: {log})")
            if stop.signum is not None:
                # Once per child: a second SIGTERM means "stop at once, without a checkpoint",
                # and this loop comes round every 0.2 s, much faster than a child's
                # iteration or validation ends (repeating it lost a run's last 1,000
                # iterations).
                for name, (child, _, _) in active.items():
                    if child.poll() is None and name not in signalled:
                        child.send_signal(signal.SIGTERM)
                        signalled.add(name)
                pending = []
            time.sleep(0.2)
            for name, (child, t0, log) in list(active.items()):
                code = child.poll()
                if code is None:
                    continue
                del active[name]
                seconds = round(time.time() - t0, 1)
                if code == 0:
                    states[name] = {"state": "finished", "seconds": seconds}
                elif stop.signum is not None:
                    states[name] = {"state": "stopped", "exit_code": code, "seconds": seconds}
                else:
                    states[name] = {"state": "failed", "exit_code": code, "seconds": seconds,
                                    "last_line": _last_line(log)}
                say(f"{name}: {states[name]['state']} after {seconds:.0f} s"
                    + (f" (exit {code}: {states[name]['last_line']})"
                       if states[name]["state"] == "failed" else ""))
                checkpointing.atomic_write_json(path, info)
    if stop.signum is not None:
        for run in runs:
            if states.get(run.name, {}).get("state") in (None, "running"):
                states[run.name] = {"state": "not started"}
        info["signal"] = stop.signum
        checkpointing.atomic_write_json(path, info)
    return info


def summary(info: dict, root: str) -> tuple[int, str]:
    """(exit code, one paragraph) of a group of runs: 0 when every run finished, 128 + the
    signal when stopped, 1 when some failed (each named, with what it printed last)."""
    states = info["runs"]
    failed = {n: s for n, s in states.items() if s["state"] == "failed"}
    done = sum(s["state"] in ("finished", "skipped: finished before") for s in states.values())
    text = f"{done} of {len(states)} runs finished in {root}."
    if info.get("signal"):
        name = signal.Signals(info["signal"]).name
        return 128 + info["signal"], (f"Stopped by {name}: {text} The running ones saved a "
                                      "checkpoint of their last iteration; run the same "
                                      "command again to go on (finished runs are skipped).")
    if failed:
        lines = "; ".join(f"{n}: {s.get('error') or s.get('last_line')}"
                          for n, s in failed.items())
        return 1, (f"{text} {len(failed)} failed ({lines}). Their logs are in {root}/logs; "
                   "fix the cause and run the same command again.")
    return 0, text + f" python -m maml_tf.report {root} tabulates them."


def _last_line(log: str) -> str:
    try:
        with open(log, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
        return lines[-1][-300:] if lines else "(no output)"
    except OSError:
        return "(no log)"
