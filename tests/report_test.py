"""``python -m maml_tf.report``: tables read from workdirs, and the session times behind them."""

import json
import os
import shutil

import pytest

from maml_tf import api, report
from maml_tf.config import Config

SMOKE = {"num_iterations": 2, "log_every": 2, "eval_every": 2, "checkpoint_every": 2,
         "eval_tasks": 10, "val_tasks": 4, "meta_batch_size": 2, "eval_shots": [3, 5],
         "eval_inner_steps": 2,
         # One program per run: meta-steps with and without per-step metrics compile
         # apart (the resume and distribute tests run both).
         "step_metrics_every": 1}


def _row(text: str, prefix: str) -> list[str]:
    rows = [line for line in text.splitlines() if line.startswith(f"| {prefix}")]
    assert len(rows) == 1, (prefix, text)
    return [c.strip() for c in rows[0].strip("|").split("|")]


def test_report_of_a_resumed_run_reads_its_results_and_sums_its_sessions(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    api.train(Config.from_dict(SMOKE), workdir)
    results = api.train(Config.from_dict({**SMOKE, "num_iterations": 4}), workdir)
    sessions = json.load(open(os.path.join(workdir, "sessions.json")))
    assert [(s["from_iteration"], s["to_iteration"]) for s in sessions] == [(0, 2), (2, 4)]
    total = results["train_seconds_total"]
    assert total["sessions"] == 2
    assert total["seconds"] == pytest.approx(sum(s["seconds"] for s in sessions), abs=0.11)
    # Evaluating again trains nothing: no session is added, and the results say so.
    other = api.evaluate_workdir(workdir, eval_tasks=6)
    assert other["iterations_this_session"] == 0
    assert len(json.load(open(os.path.join(workdir, "sessions.json")))) == 2

    assert report.main(["report", workdir, str(tmp_path / "missing.log")]) == 0
    out, err = capsys.readouterr()
    assert "skipped" in err and "missing.log" in err
    header = [c.strip() for c in out.splitlines()[0].strip("|").split("|")]
    for shot in (3, 5):
        row = dict(zip(header, _row(out, f"sinusoid {shot}-shot")))
        loss = results["test"][f"{shot}shot"]["loss"]
        assert row["ours: MSE, 10 query points"] == \
            f"{loss['mean'][-1]:.3f} ± {loss['ci95'][-1]:.3f}"
        assert row["iterations × meta-batch"] == "4 × 2"
        assert row["test tasks"] == "10" and row["test steps"] == "2"
        assert row["train wall time"].endswith("(2 sessions)")
        assert row["paper"] == ("0.35 after 10 steps (Finn et al. 2017)" if shot == 5 else "—")
    # --all_steps: every inner step, the interval on the last.
    assert report.main(["report", "--all_steps", workdir]) == 0
    loss = results["test"]["5shot"]["loss"]
    row = _row(capsys.readouterr().out, "sinusoid 5-shot")
    assert row[3] == " / ".join(f"{m:.3f}" for m in loss["mean"][:-1]) + \
        f" / {loss['mean'][-1]:.3f} ± {loss['ci95'][-1]:.3f}"


def _classification_run(root, name, algorithm, evaluations, seconds=60.0):
    """A workdir as train and evaluate leave it: config.json, results.json and results-*.json
    in the format of ``harness.final_evaluation`` (values chosen by the test)."""
    workdir = os.path.join(root, name)
    os.makedirs(workdir)
    config = Config(dataset="omniglot", algorithm=algorithm, way=5, shot=1)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json())
    for i, (mode, queries, accuracy) in enumerate(evaluations):
        results = {
            "protocol": {"dataset": "omniglot", "algorithm": algorithm, "way": 5, "shots": [1],
                         "queries": queries, "eval_mode": mode, "inner_steps": 3,
                         "num_tasks": 600, "checkpoint_step": 2000},
            "test": {"1shot": {"accuracy": {"mean": [0.2, accuracy], "ci95": [0.01, 0.005]},
                               "loss": {"mean": [1.6, 0.1], "ci95": [0.1, 0.01]},
                               "num_tasks": 600}},
            "train_seconds_this_session": seconds if i == 0 else 0.0,
            "iterations_this_session": 2000 if i == 0 else 0,
            "environment": {"cpu": "Some CPU", "cpu_count": 8, "accelerators": None},
        }
        name = "results.json" if i == 0 else f"results-{mode}-{queries}.json"
        with open(os.path.join(workdir, name), "w") as f:
            json.dump(results, f)
    return workdir


def test_report_puts_each_evaluation_protocol_in_its_own_column(tmp_path, capsys):
    maml = _classification_run(tmp_path, "maml", "maml", [
        ("transductive", 1, 0.97), ("support", 15, 0.91), ("transductive", 15, 0.94)])
    proto = _classification_run(tmp_path, "proto", "protonet", [
        ("transductive", 1, 0.98), ("support", 15, 0.955)], seconds=3725.0)
    training = os.path.join(tmp_path, "still_training")   # no results yet: skipped, said
    os.makedirs(training)
    shutil.copy(os.path.join(maml, "config.json"), training)
    assert report.main(["report", str(tmp_path)]) == 0      # a directory of workdirs
    out, err = capsys.readouterr()
    assert "skipped" in err and "still_training" in err and "still_training" not in out
    header = [c.strip() for c in out.splitlines()[0].strip("|").split("|")]
    # The papers' protocol first, then by mode and query count.
    assert header[3:6] == ["ours: transductive, 1 query per class",
                           "ours: transductive, 15 queries per class",
                           "ours: support, 15 queries per class"]
    rows = [dict(zip(header, [c.strip() for c in line.strip("|").split("|")]))
            for line in out.splitlines()[2:4]]
    by_algorithm = {r["algorithm"]: r for r in rows}
    assert by_algorithm["maml"]["ours: support, 15 queries per class"] == "91.00 ± 0.50 %"
    assert by_algorithm["maml"]["paper"] == "98.7 ± 0.4 % (Finn et al. 2017)"
    assert by_algorithm["protonet"]["ours: transductive, 15 queries per class"] == "—"
    assert by_algorithm["protonet"]["train wall time"] == "1 h 2 min"
    assert by_algorithm["maml"]["train wall time"] == "1 min 0 s"
    assert by_algorithm["maml"]["hardware"] == "8-core Some CPU CPU"
    # A run stopped before its final evaluation and evaluated afterwards is reported from
    # its evaluations; its training time is not known.
    os.remove(os.path.join(proto, "results.json"))
    shutil.rmtree(maml)
    assert report.main(["report", proto]) == 0
    row = _row(capsys.readouterr().out, "Omniglot 5-way 1-shot")
    assert row[3] == "95.50 ± 0.50 %" and row[-1] == "not recorded"


def test_report_errors_name_the_workdir_and_the_fix(tmp_path, capsys):
    assert report.main(["report", str(tmp_path)]) == 1
    assert "holds no config.json" in capsys.readouterr().err
    workdir = _classification_run(tmp_path, "run", "maml", [("transductive", 1, 0.9)])
    with open(os.path.join(workdir, "results.json"), "w") as f:
        f.write("{not json")
    assert report.main(["report", workdir]) == 1
    err = capsys.readouterr().err
    assert "results.json is not a readable results file" in err and "maml_tf.evaluate" in err
    os.remove(os.path.join(workdir, "results.json"))
    assert report.main(["report", workdir]) == 1
    assert "has not finished its final evaluation" in capsys.readouterr().err
    assert report.main(["report", "--wrong", workdir]) == 2
    assert "Unknown flag --wrong" in capsys.readouterr().err


def test_a_session_that_cannot_be_recorded_neither_fails_nor_hides_why_it_ended(
        tmp_path, monkeypatch, caplog):
    from maml_tf import checkpointing

    def refuse(path, obj):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(checkpointing, "atomic_write_json", refuse)
    with checkpointing.training_session(str(tmp_path), 0) as session:   # a finished session
        session.to_iteration = 3
    assert "Could not record this training session" in caplog.text
    with pytest.raises(KeyboardInterrupt):                               # an interrupted one
        with checkpointing.training_session(str(tmp_path), 0) as session:
            session.to_iteration = 1
            raise KeyboardInterrupt
    assert checkpointing.read_sessions(str(tmp_path)) == []
