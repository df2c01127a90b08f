"""Results tables read from runs: ``python -m maml_tf.report WORKDIR...``.

Prints the markdown table that ``runs/README.md`` shows, built only from what each workdir
holds: ``config.json`` (the run's settings), ``results.json`` (the final evaluation of
``maml_tf.train``), every ``results-*.json`` that ``maml_tf.evaluate`` wrote (other
evaluation modes, query counts, ...) and ``sessions.json`` (training wall time over all
sessions). One row per workdir and test shot count; one column per evaluation protocol found.
Runs that differ only by their seed (``--seeds``, ``maml_tf.sweep``) are one row: the mean
over seeds ± the 95% CI over seeds (Student's t, ``maml_tf.seeds``), the seed count, and the
mean of the seeds' own test-task CIs beside it; ``--per_seed`` adds each seed's own row.
``--compare=NAME`` adds a table of each seed group's difference to the group named NAME with
its 95% CI by Welch's t over seeds, saying which differences are larger than the seed spread.

    python -m maml_tf.report ~/maml_runs/omniglot_5w1s ~/maml_runs/omniglot_5w1s_protonet
    python -m maml_tf.report --all_steps ~/maml_runs    # every run in it; every step / shot
    python -m maml_tf.report --per_seed ~/maml_runs/family   # a sweep: a row per grid point
    python -m maml_tf.report --compare=maml ~/maml_runs/family   # which differ beyond seeds

Paper numbers (``papers.PAPER``) appear beside runs of their data set, way, shot, algorithm.
"""

from __future__ import annotations

import os
import sys

from maml_tf.papers import DATASET_NAMES, PAPER
from maml_tf.run_records import Evaluation, ReportError, RunRecord, read_runs
from maml_tf.seeds import difference_interval, group_key, seed_interval


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


def _columns(runs: list[RunRecord]) -> list[str]:
    found: dict[str, tuple] = {}
    for run in runs:
        for e in [run.main] + run.others:
            found.setdefault(e.column, e.order)
    return sorted(found, key=lambda c: found[c])


def _groups(runs: list[RunRecord]) -> list[list[RunRecord]]:
    """The runs, grouped by what they compute (all but the seed), in the order found."""
    groups: dict[tuple, list[RunRecord]] = {}
    for run in runs:
        # Seeds of a --stop_when_flat experiment end at different iterations (or at its
        # --num_iterations): still one experiment.
        iterations = "when flat" if run.config.get("stop_when_flat") else run.iterations
        groups.setdefault((group_key(run.config), iterations), []).append(run)
    return list(groups.values())


def table(runs: list[RunRecord], all_steps: bool = False, per_seed: bool = False) -> str:
    """The markdown table of ``runs``: one row per run and test shot count, and one per group
    of runs that differ only by seed (``per_seed``: then each seed's row too)."""
    columns = _columns(runs)
    header = (["cell", "algorithm", "paper"] + [f"ours: {c}" for c in columns] +
              ["test steps", "test tasks", "iterations × meta-batch", "hardware",
               "train wall time"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for members in _groups(runs):
        if len(members) > 1:
            lines += _seed_rows(members, columns, all_steps)
        if len(members) == 1 or per_seed:
            for run in members:
                label = f"seed {run.config.get('seed')}" if len(members) > 1 else None
                lines += _run_rows(run, columns, all_steps, label)
    return "\n".join(lines)


def _last_values(members: list[RunRecord], column: str, shot_key: str) -> list[float] | None:
    """Each seed's final value in ``column`` at ``shot_key``; None when a seed lacks it."""
    evaluations = [_by_column(run).get(column) for run in members]
    if any(e is None or shot_key not in e.by_shot for e in evaluations):
        return None
    return [e.by_shot[shot_key][0][-1] for e in evaluations if e is not None]


def comparison(runs: list[RunRecord], reference: str) -> str:
    """Each group of seeds of the same cell (data set, way, shot) against the group the table
    names ``reference`` (``maml``, ``mamlpp (BNRS)``, ...), per evaluation column: the difference of
    the seed means ± its 95% CI by Welch's t (``seeds.difference_interval``), and whether
    the difference is larger than the seeds' spread. ``ReportError`` unless exactly one
    group of two or more seeds has that name."""
    groups = [m for m in _groups(runs) if len(m) > 1]
    names = [_name(m[0].config, m[0].iterations) for m in groups]
    if names.count(reference) != 1:
        raise ReportError(
            f"--compare={reference} must name exactly one group of two or more seeds, and "
            f"{names.count(reference)} are named so. The groups are: "
            f"{', '.join(sorted(set(names))) or 'none (run with --seeds=N)'}; a name that "
            "two groups share (other settings) is compared by passing only one of them.")
    ref = groups[names.index(reference)]
    columns = _columns(runs)
    lines = ["| algorithm | cell | " + " | ".join(f"Δ {c}" for c in columns) + " |",
             "|" + "---|" * (len(columns) + 2)]
    for members, name in zip(groups, names):
        if members is ref:
            continue
        fmt, unit = _format(members[0].main.metric)
        for shot_key in members[0].main.by_shot:
            cell = _cell(members[0].config, shot_key)
            if cell != _cell(ref[0].config, shot_key):   # another data set, way or shot
                continue
            cells = []
            for column in columns:
                a, b = _last_values(members, column, shot_key), _last_values(ref, column, shot_key)
                if a is None or b is None:
                    cells.append("—")
                    continue
                diff, half, df = difference_interval(a, b)
                verdict = "**beyond the seed spread**" if abs(diff) > half else "within it"
                cells.append(f"{'+' if diff >= 0 else '−'}{fmt(abs(diff))} ± {fmt(half)}{unit} "
                             f"(df {df:.1f}; {verdict})")
            lines.append(f"| {name}, {len(members)} seeds | {cell} | " + " | ".join(cells) + " |")
    return (f"Differences to {reference} ({len(ref)} seeds): the seed means' difference ± "
            "its 95% CI by Welch's t over seeds\n\n" + "\n".join(lines))


def _iterations(members: list[RunRecord]) -> str:
    """The iterations × meta-batch cell of one run or a group of seeds."""
    steps = sorted({run.iterations for run in members})
    text = f"{steps[0]:,}" if len(steps) == 1 else f"{steps[0]:,}-{steps[-1]:,}"
    if any(run.stopped_when_flat for run in members):
        text += " (stopped when flat)"
    return f"{text} × {members[0].config.get('meta_batch_size', '?')}"


def _row(run: RunRecord, shot_key: str, name: str, values: list[str], seconds: float | None,
         sessions: int, members: list[RunRecord] | None = None) -> str:
    row = ([_cell(run.config, shot_key), name, _paper(run.config, shot_key, run.iterations)] +
           values + [_steps(run.config, run.main), str(run.main.protocol.get("num_tasks", "?")),
                     _iterations(members or [run]), _hardware(run.environment),
                     _duration(seconds, sessions)])
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
                 seconds, sessions, members)
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
FLAT_NOTE = ("\"Stopped when flat\": --stop_when_flat ended the training once validation had "
             "not risen beyond its CI for that many iterations.")


def main(argv: list[str]) -> int:
    args = [a for a in argv[1:] if not a.startswith("--")]
    flags = [a for a in argv[1:] if a.startswith("--")]
    compare = [f.split("=", 1)[1] for f in flags if f.startswith("--compare=")]
    unknown = [f for f in flags if f not in ("--all_steps", "--per_seed", "--help")
               and not f.startswith("--compare=")]
    if "--help" in flags or not args or unknown:
        print(__doc__ if not unknown else f"Unknown flag {unknown[0]}: the flags are "
              "--all_steps, --per_seed and --compare=NAME. Usage: python -m maml_tf.report "
              "[--all_steps] [--per_seed] [--compare=NAME] WORKDIR...",
              file=sys.stderr if unknown or not args else sys.stdout)
        return 0 if "--help" in flags and not unknown else 2
    try:
        runs = read_runs(args)
        differences = [comparison(runs, name) for name in compare]
    except ReportError as e:
        print(f"Report error: {e}", file=sys.stderr)
        return 1
    print(table(runs, all_steps="--all_steps" in flags, per_seed="--per_seed" in flags))
    print()
    print(FOOTNOTE + (" " + FLAT_NOTE if any(run.stopped_when_flat for run in runs) else ""))
    for text in differences:
        print()
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
