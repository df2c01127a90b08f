"""Results tables read from runs: ``python -m maml_tf.report WORKDIR...``.

Prints the markdown table that ``runs/README.md`` shows, built only from what each workdir
holds: ``config.json`` (the run's settings), ``results.json`` (the final evaluation of
``maml_tf.train``), every ``results-*.json`` that ``maml_tf.evaluate`` wrote (other
evaluation modes, query counts, ...) and ``sessions.json`` (training wall time over all
sessions). One row per workdir and test shot count; one column per evaluation protocol found.
Runs that differ only by their seed (``--seeds``, ``maml_tf.sweep``) are one row: the mean
over seeds ± the 95% CI over seeds (Student's t, ``maml_tf.seeds``), the seed count, and the
mean of the seeds' own test-task CIs beside it; ``--per_seed`` adds each seed's own row.

    python -m maml_tf.report ~/maml_runs/omniglot_5w1s ~/maml_runs/omniglot_5w1s_protonet
    python -m maml_tf.report --all_steps ~/maml_runs    # every run in it; every step / shot
    python -m maml_tf.report --per_seed ~/maml_runs/family   # a sweep: a row per grid point

Paper numbers (``papers.PAPER``) appear beside runs of their data set, way, shot, algorithm.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import sys

from maml_tf.config import flatten_config
from maml_tf.papers import DATASET_NAMES, PAPER
from maml_tf.seeds import group_key, seed_interval


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
                     seconds, int(total.get("sessions") or (1 if seconds is not None else 0)))


def _name(config: dict, iterations: int) -> str:
    """The algorithm as the tables name it, with the switches that change what it is."""
    name = "oracle" if config.get("oracle") else config.get("algorithm", "?")
    if config.get("bnrs"):
        name += " (BNRS)"
    if iterations == 0:
        name += " (random init., 0 iterations)"
    return name


def _cell(config: dict, shot_key: str) -> str:
    dataset = str(config.get("dataset", "?"))
    folder = os.path.basename(str(config.get("data_dir") or "").rstrip("/")) * (dataset == "folder")
    dataset = DATASET_NAMES.get(dataset, dataset) + (f" {folder}" if folder else "")
    if not shot_key:
        return dataset
    shot = shot_key.replace("shot", "")
    if config.get("dataset") == "sinusoid":
        return f"{dataset} {shot}-shot"
    return f"{dataset} {config.get('way')}-way {shot}-shot"


def _paper(config: dict, shot_key: str, iterations: int) -> str:
    algorithm = "oracle" if config.get("oracle") else config.get("algorithm")
    if iterations == 0:
        algorithm = "random"
    key: tuple
    if config.get("dataset") in ("sinusoid",):
        key = (config["dataset"], None, int(shot_key.replace("shot", "")), algorithm)
    elif not shot_key:
        key = (config.get("dataset"), None, None, algorithm)
    else:
        key = (config.get("dataset"), config.get("way"), int(shot_key.replace("shot", "")),
               algorithm)
    return PAPER.get(key, "—")


def _format(metric: str):
    """(format a value, unit) of ``metric`` as the tables show it."""
    scale, unit, digits = {"accuracy": (100.0, " %", 2), "mse": (1.0, "", 3),
                           "return": (1.0, "", 2)}[metric]
    return (lambda v: f"{v * scale:.{digits}f}"), unit


def _value(evaluation: Evaluation, shot_key: str, all_steps: bool) -> str:
    if shot_key not in evaluation.by_shot:
        return "—"
    mean, ci = evaluation.by_shot[shot_key]
    fmt, unit = _format(evaluation.metric)
    last = f"{fmt(mean[-1])} ± {fmt(ci[-1])}{unit}"
    # A policy's return is reported after every step, as the papers' RL tables do.
    if (all_steps or evaluation.metric == "return") and len(mean) > 1:
        return " / ".join(fmt(m) for m in mean[:-1]) + " / " + last
    return last


def _duration(seconds: float | None, sessions: int) -> str:
    if seconds is None:
        return "not recorded"
    s = int(round(seconds))
    h, m, s = s // 3600, s % 3600 // 60, s % 60
    text = f"{h} h {m} min" if h else (f"{m} min {s} s" if m else f"{s} s")
    return text + (f" ({sessions} sessions)" if sessions > 1 else "")


def _hardware(env: dict) -> str:
    accelerators = env.get("accelerators")
    if accelerators:
        return f"{len(accelerators)} × {accelerators[0]}"
    return f"{env.get('cpu_count', '?')}-core {env.get('cpu', 'CPU')} CPU"


def _steps(config: dict, evaluation: Evaluation) -> str:
    p = evaluation.protocol
    if evaluation.metric == "return":
        return f"{p.get('inner_steps')} (rates {', '.join(str(r) for r in p.get('inner_lrs', []))})"
    return str(p.get("inner_steps", "?"))


def _seeds_value(evaluations: list[Evaluation], shot_key: str, all_steps: bool) -> str:
    """Mean over seeds ± the 95% CI over seeds, the seed count, and the mean of the seeds'
    own test-task CIs, of the last value of each seed's evaluation."""
    if any(shot_key not in e.by_shot for e in evaluations):
        return "—"
    runs = [e.by_shot[shot_key] for e in evaluations]
    fmt, unit = _format(evaluations[0].metric)
    mean, half = seed_interval([m[-1] for m, _ in runs])
    tasks = sum(c[-1] for _, c in runs) / len(runs)
    text = f"{fmt(mean)} ± {fmt(half)}{unit} ({len(runs)} seeds; tasks ± {fmt(tasks)})"
    steps = min(len(m) for m, _ in runs)
    if (all_steps or evaluations[0].metric == "return") and steps > 1:
        means = [sum(m[k] for m, _ in runs) / len(runs) for k in range(steps - 1)]
        return " / ".join(fmt(v) for v in means) + " / " + text
    return text


def _by_column(run: RunRecord) -> dict[str, Evaluation]:
    by_column = {e.column: e for e in run.others}
    by_column[run.main.column] = run.main   # the run's own results.json wins a tie
    return by_column


def table(runs: list[RunRecord], all_steps: bool = False, per_seed: bool = False) -> str:
    """The markdown table of ``runs``: one row per run and test shot count, and one per group
    of runs that differ only by seed (``per_seed``: then each seed's row too)."""
    found: dict[str, tuple] = {}
    for run in runs:
        for e in [run.main] + run.others:
            found.setdefault(e.column, e.order)
    columns = sorted(found, key=lambda c: found[c])
    header = (["cell", "algorithm", "paper"] + [f"ours: {c}" for c in columns] +
              ["test steps", "test tasks", "iterations × meta-batch", "hardware",
               "train wall time"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    groups: dict[tuple, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault((group_key(run.config), run.iterations), []).append(run)
    for members in groups.values():
        if len(members) > 1:
            lines += _seed_rows(members, columns, all_steps)
        if len(members) == 1 or per_seed:
            for run in members:
                label = f"seed {run.config.get('seed')}" if len(members) > 1 else None
                lines += _run_rows(run, columns, all_steps, label)
    return "\n".join(lines)


def _row(run: RunRecord, shot_key: str, name: str, values: list[str], seconds: float | None,
         sessions: int) -> str:
    row = ([_cell(run.config, shot_key), name, _paper(run.config, shot_key, run.iterations)] +
           values + [_steps(run.config, run.main), str(run.main.protocol.get("num_tasks", "?")),
                     f"{run.iterations:,} × {run.config.get('meta_batch_size', '?')}",
                     _hardware(run.environment), _duration(seconds, sessions)])
    return "| " + " | ".join(row) + " |"


def _run_rows(run: RunRecord, columns: list[str], all_steps: bool,
              label: str | None = None) -> list[str]:
    by_column = _by_column(run)
    name = _name(run.config, run.iterations) + (f", {label}" if label else "")
    return [_row(run, shot_key, name,
                 [_value(by_column[c], shot_key, all_steps) if c in by_column else "—"
                  for c in columns], run.train_seconds, run.sessions)
            for shot_key in run.main.by_shot]


def _seed_rows(members: list[RunRecord], columns: list[str], all_steps: bool) -> list[str]:
    first = members[0]
    columns_of = [_by_column(run) for run in members]
    known = [run.train_seconds for run in members]
    seconds = None if any(s is None for s in known) else sum(s or 0.0 for s in known)
    sessions = sum(run.sessions for run in members)
    name = f"{_name(first.config, first.iterations)}, {len(members)} seeds"
    return [_row(first, shot_key, name,
                 [_seeds_value([b[c] for b in columns_of], shot_key, all_steps)
                  if all(c in b for b in columns_of) else "—" for c in columns],
                 seconds, sessions)
            for shot_key in first.main.by_shot]


FOOTNOTE = ("Mean ± 95% CI (1.96 · std / √tasks) over fixed test tasks, after the last test "
            "step (or, for black-box learners, after all support shots; returns after each "
            "step 0 / 1 / ...); `transductive` "
            "predicts a task's queries together (the papers' protocol), `support` normalises "
            "each query with its task's support statistics, `per_example` predicts each query "
            "alone. Wall time is training (compilation and validation included) summed over "
            "the run's sessions. A row of n seeds: the mean over the seeds' results ± the 95% "
            "CI over seeds (t_{0.975, n-1} · s / √n, s with ddof = 1), then the mean of the "
            "seeds' own test-task CIs; its wall time is the seeds' sum.")


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


def main(argv: list[str]) -> int:
    args = [a for a in argv[1:] if not a.startswith("--")]
    flags = [a for a in argv[1:] if a.startswith("--")]
    unknown = [f for f in flags if f not in ("--all_steps", "--per_seed", "--help")]
    if "--help" in flags or not args or unknown:
        print(__doc__ if not unknown else f"Unknown flag {unknown[0]}: the flags are "
              "--all_steps and --per_seed. Usage: python -m maml_tf.report [--all_steps] "
              "[--per_seed] WORKDIR...",
              file=sys.stderr if unknown or not args else sys.stdout)
        return 0 if "--help" in flags and not unknown else 2
    try:
        runs = read_runs(args)
    except ReportError as e:
        print(f"Report error: {e}", file=sys.stderr)
        return 1
    print(table(runs, all_steps="--all_steps" in flags, per_seed="--per_seed" in flags))
    print()
    print(FOOTNOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
