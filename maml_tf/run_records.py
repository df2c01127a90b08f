"""What a run's workdir holds, read for the results tables (``maml_tf.report``).

``read_run`` reads one workdir: ``config.json`` (its settings), ``results.json`` (the final
evaluation of ``maml_tf.train``), every ``results-*.json`` that ``maml_tf.evaluate`` wrote
for the same checkpoint, and the training wall time over sessions. ``read_runs`` finds the
runs under directories (a sweep's grid points hold their seeds' workdirs) and skips, with a
note, those still training. Nothing here writes.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import sys

from maml_tf.config import flatten_config


class ReportError(ValueError):
    """A workdir that holds no readable run."""


@dataclasses.dataclass
class Evaluation:
    """One results file: its protocol and, per test shot count, the metric by index."""
    path: str
    protocol: dict
    by_shot: dict[str, tuple[list[float], list[float]]]   # shot key -> (mean, ci95)
    metric: str                                           # accuracy | mse | return

    @property
    def column(self) -> str:
        """The column this evaluation belongs to, named by what distinguishes protocols."""
        p = self.protocol
        if self.metric == "return":
            return f"return, {p.get('trajectories_per_step', '?')} trajectories per step"
        if self.metric == "mse":
            return f"MSE, {p.get('queries', '?')} query points"
        q = p.get("queries", "?")
        column = f"{p.get('eval_mode', 'transductive')}, {q} {'query' if q == 1 else 'queries'} per class"
        if p.get("eval_dataset"):   # cross-domain: the test classes of another data set
            where = [p["eval_dataset"], os.path.basename(str(p.get("eval_data_dir") or "").rstrip("/")),
                     f"{p.get('eval_split_file')} split" * bool(p.get("eval_split_file"))]
            column += ", tested on " + " ".join(w for w in where if w)
        return column

    @property
    def order(self) -> tuple:
        """Columns sort by metric, then the papers' protocol first, then query count."""
        p = self.protocol
        modes = ("transductive", "support", "per_example")
        mode = p.get("eval_mode", "transductive")
        rank = modes.index(mode) if mode in modes else 3
        return (self.metric, bool(p.get("eval_dataset")), rank, p.get("queries") or 0)


@dataclasses.dataclass
class RunRecord:
    workdir: str
    config: dict
    main: Evaluation                    # results.json: the protocol the run was trained for
    others: list[Evaluation]            # results-*.json of the same checkpoint
    environment: dict
    train_seconds: float | None         # over all sessions; None when unknown
    sessions: int
    stopped_when_flat: dict | None = None   # --stop_when_flat ended its training (results.json)

    @property
    def iterations(self) -> int:
        return int(self.main.protocol.get("checkpoint_step", 0))


def _metric_of(test: dict) -> str:
    if "return" in test:
        return "return"
    first = next(v for v in test.values() if isinstance(v, dict))
    return "accuracy" if "accuracy" in first else "mse"


def read_evaluation(path: str) -> Evaluation:
    """A results file -> ``Evaluation``; ``ReportError`` naming the file when unreadable."""
    try:
        with open(path) as f:
            results = json.load(f)
        protocol, test = results["protocol"], results["test"]
        metric = _metric_of(test)
        if metric == "return":
            by_shot = {"": (test["return"]["mean"], test["return"]["ci95"])}
        else:
            key = "accuracy" if metric == "accuracy" else "loss"
            by_shot = {shot: (v[key]["mean"], v[key]["ci95"])
                       for shot, v in test.items() if isinstance(v, dict)}
    except (OSError, ValueError, KeyError, StopIteration, TypeError) as e:
        raise ReportError(f"{path} is not a readable results file ({type(e).__name__}: {e}). "
                          "Re-create it with python -m maml_tf.evaluate --workdir=<its "
                          "workdir>.") from None
    return Evaluation(path, protocol, by_shot, metric)


def read_run(workdir: str) -> RunRecord:
    """Everything the table needs from one workdir."""
    config_path, main_path = (os.path.join(workdir, n) for n in ("config.json", "results.json"))
    if not os.path.exists(config_path):
        raise ReportError(f"{workdir} holds no config.json: pass the workdir of a run started "
                          "with python -m maml_tf.train.")
    extra = sorted(glob.glob(os.path.join(workdir, "results-*.json")))
    if not os.path.exists(main_path) and not extra:
        raise ReportError(f"{workdir} holds no results.json: the run has not finished its "
                          "final evaluation. Resume it with python -m maml_tf.train "
                          f"--flagfile={os.path.join(workdir, 'flags.cfg')}, or evaluate its "
                          f"latest checkpoint with python -m maml_tf.evaluate --workdir={workdir}.")
    try:
        with open(config_path) as f:
            # Sectioned, or flat as runs written before the config's sections have it.
            config = flatten_config(json.load(f))
    except (OSError, ValueError) as e:   # ConfigError is a ValueError
        raise ReportError(f"{workdir}: config.json is unreadable ({e}).") from None
    evaluations = [read_evaluation(p) for p in extra]
    if os.path.exists(main_path):
        main = read_evaluation(main_path)
    else:
        # A run stopped before its final evaluation and evaluated by maml_tf.evaluate: its
        # latest checkpoint's evaluation, the papers' protocol first.
        main = min(evaluations, key=lambda e: (-e.protocol.get("checkpoint_step", 0), e.order))
        evaluations.remove(main)
    with open(main.path) as f:
        raw = json.load(f)
    step = main.protocol.get("checkpoint_step")
    others = [e for e in evaluations if e.protocol.get("checkpoint_step") == step]
    total = raw.get("train_seconds_total") or {}
    seconds = total.get("seconds") if total.get("sessions") else None
    if seconds is None and step and raw.get("iterations_this_session") == step \
            and raw.get("train_seconds_this_session"):
        seconds = raw.get("train_seconds_this_session")   # trained in one session
    elif seconds is None and step == 0:
        seconds = 0.0
    return RunRecord(workdir, config, main, others, raw.get("environment") or {},
                     seconds, int(total.get("sessions") or (1 if seconds is not None else 0)),
                     raw.get("stopped_when_flat"))


def _runs_inside(path: str, depth: int = 3) -> list[str]:
    """The workdirs under ``path``, down to ``depth`` folders (a sweep's grid point holds its
    seeds' workdirs); folders a run moved aside (``replaced-*``) are not runs of it."""
    found = []
    for name in sorted(os.listdir(path)):
        sub = os.path.join(path, name)
        if not os.path.isdir(sub) or name.startswith("replaced-"):
            continue
        if os.path.exists(os.path.join(sub, "config.json")):
            found.append(sub)
        elif depth > 1:
            found += _runs_inside(sub, depth - 1)
    return found


def workdirs(paths: list[str]) -> tuple[list[tuple[str, bool]], list[str]]:
    """([(run workdir, named explicitly)], notes on skipped paths). A directory without
    config.json stands for the runs inside it (a sweep's, a seed group's); files (a shell
    glob's logs) are skipped with a note."""
    found, notes = [], []
    for path in paths:
        if os.path.exists(os.path.join(path, "config.json")):
            found.append((path, True))
        elif os.path.isdir(path):
            inside = _runs_inside(path)
            if not inside:
                raise ReportError(f"{path} holds no config.json and no run directories: pass "
                                  "the workdir of a run started with python -m maml_tf.train, "
                                  "or a directory of such workdirs.")
            found += [(w, False) for w in inside]
        else:
            notes.append(f"skipped {path}: not a workdir")
    return found, notes


def read_runs(paths: list[str]) -> list[RunRecord]:
    """The runs of ``paths`` (see ``workdirs``). A run found inside a directory that has no
    results yet (still training) is skipped with a note on stderr; a workdir named
    explicitly must be readable."""
    found, notes = workdirs(paths)
    runs = []
    for workdir, explicit in found:
        try:
            runs.append(read_run(workdir))
        except ReportError as e:
            if explicit:
                raise
            notes.append(f"skipped {workdir}: {e}")
    for note in notes:
        print(note, file=sys.stderr)
    return runs
