"""Runs you can compare: the CI over seeds, grids, sweeps that resume, report rows over
seeds, and the HParams summaries TensorBoard reads."""

from __future__ import annotations

import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from maml_tf import grid, report, seeds
from maml_tf.config import Config, ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- statistics over seeds -------------------------------------------------------------------
@pytest.mark.parametrize("df, published", [(1, 12.7062047361747), (2, 4.30265272974946),
                                           (4, 2.77644510519779), (10, 2.22813885198627),
                                           (30, 2.04227245630124)])
def test_t_quantile_matches_the_published_table(df, published):
    assert seeds.t_quantile(0.975, df) == pytest.approx(published, rel=1e-9)
    assert seeds.t_quantile(0.025, df) == pytest.approx(-published, rel=1e-9)


def test_the_ci_over_seeds_is_t_times_s_over_root_n():
    values = [0.9533, 0.9587, 0.9601]
    mean = sum(values) / 3
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)   # ddof = 1, by hand
    got_mean, half = seeds.seed_interval(values)
    assert got_mean == pytest.approx(mean, abs=1e-15)
    assert half == pytest.approx(4.30265272974946 * s / math.sqrt(3), rel=1e-9)
    assert math.isnan(seeds.seed_interval([0.5])[1])


def test_welch_difference_of_two_seed_groups_against_a_hand_computation():
    # Equal variances (1) and sizes (3): se = √(1/3 + 1/3), df = 2 (n - 1) = 4.
    diff, half, df = seeds.difference_interval([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert (diff, df) == (pytest.approx(-3.0), pytest.approx(4.0))
    assert half == pytest.approx(2.77644510519779 * math.sqrt(2.0 / 3.0), rel=1e-9)
    # Unequal: s² = 9 over 3 seeds and 0.5 over 2, so s²/n = 3 and 0.25, se² = 3.25, and
    # Welch-Satterthwaite df = 3.25² / (3² / 2 + 0.25² / 1) = 10.5625 / 4.5625.
    diff, half, df = seeds.difference_interval([0.0, 3.0, 6.0], [1.0, 2.0])
    assert diff == pytest.approx(1.5) and df == pytest.approx(10.5625 / 4.5625, rel=1e-12)
    assert seeds.t_cdf(half / math.sqrt(3.25), df) == pytest.approx(0.975, abs=1e-10)
    assert 4.30265272974946 > half / math.sqrt(3.25) > 2.77644510519779   # 2 < df < 4
    assert seeds.difference_interval([0.5, 0.5], [0.4, 0.4]) == (pytest.approx(0.1), 0.0, 2.0)
    with pytest.raises(ValueError, match="two or more values"):
        seeds.difference_interval([0.5], [0.4, 0.3])


def test_runs_that_differ_only_by_seed_and_logging_are_one_experiment():
    a = Config(dataset="omniglot", seed=0).to_flat_dict()
    b = Config(dataset="omniglot", seed=1, log_every=7, jit_compile=False).to_flat_dict()
    c = Config(dataset="omniglot", seed=1, inner_lr=0.1).to_flat_dict()
    assert seeds.group_key(a) == seeds.group_key(b) != seeds.group_key(c)
    # A run written before a setting existed (its config.json lacks it) ran with its default.
    older = {k: v for k, v in a.items() if k not in ("stop_when_flat", "eval_shots")}
    assert seeds.group_key(older) == seeds.group_key(a)
    assert seeds.group_key({**a, "eval_shots": [1]}) != seeds.group_key(a)


# -- grids ---------------------------------------------------------------------------------------
def test_a_grid_is_the_product_of_its_axes_times_the_seeds():
    axes = grid.parse_grid(["algorithm=maml,protonet", "--inner_lr=0.1, 0.4"])
    assert axes == [("algorithm", ["maml", "protonet"]), ("inner_lr", ["0.1", "0.4"])]
    runs = grid.plan(axes, [0, 1])
    assert len(runs) == 8
    assert runs[0] == grid.PlannedRun("algorithm=maml,inner_lr=0.1/seed-0",
                                      ("--algorithm=maml", "--inner_lr=0.1", "--seed=0"))
    assert runs[-1].name == "algorithm=protonet,inner_lr=0.4/seed-1"
    assert [r.name for r in grid.plan([], [3, 4])] == ["seed-3", "seed-4"]
    assert [r.flags for r in grid.plan(axes[:1], None)] == [("--algorithm=maml",),
                                                             ("--algorithm=protonet",)]
    assert grid.parse_seeds(["3"], first=2) == [2, 3, 4]
    assert grid.parse_seeds(["0", "5"]) == [0, 5]


@pytest.mark.parametrize("specs, message", [
    (["algorithm"], "is not key=value1,value2"),
    (["inner_rl=0.1"], "'inner_rl' is not a flag of a run; did you mean 'inner_lr'"),
    (["seed=1,2"], "seeds are --seeds=N"),
    (["eval_shots=1,5"], "a list-valued flag cannot be a grid axis"),
    (["way=5", "way=20"], "names 'way' twice"),
    (["way=5,5"], "each value once"),
])
def test_bad_grids_are_one_sentence(specs, message):
    with pytest.raises(ConfigError, match=message):
        grid.parse_grid(specs)


# A stand-in for `python -m maml_tf.train`: writes what a finished run leaves, fails for
# --inner_lr=0.5, and for --algorithm=slow trains until SIGTERM (then "checkpoints").
FAKE_TRAIN = r"""
import json, os, signal, sys, time
args = dict(a[2:].partition("=")[::2] for a in sys.argv[1:])
wd = args["workdir"]
os.makedirs(wd, exist_ok=True)
with open(os.path.join(wd, "calls"), "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\n")
if args.get("inner_lr") == "0.5":
    print("Stopped: Non-finite meta-loss at iteration 1.")
    sys.exit(1)
json.dump({"optim": {"num_iterations": 3}}, open(os.path.join(wd, "config.json"), "w"))
if args.get("algorithm") == "slow" and not os.path.exists(os.path.join(wd, "ckpt")):
    def stop(*_):
        with open(os.path.join(wd, "signals"), "a") as f:
            f.write("TERM\n")
        if stop.stopping:   # a second SIGTERM would mean: stop at once, without a checkpoint
            return
        stop.stopping = True
        time.sleep(1.5)     # as a real run, it finishes its iteration, then checkpoints
        open(os.path.join(wd, "ckpt"), "w").close()
        sys.exit(143)
    stop.stopping = False
    signal.signal(signal.SIGTERM, stop)
    open(os.path.join(wd, "training"), "w").close()
    time.sleep(120)
json.dump({"protocol": {"checkpoint_step": 3}}, open(os.path.join(wd, "results.json"), "w"))
"""


def _fake(tmp_path):
    path = tmp_path / "fake_train.py"
    path.write_text(FAKE_TRAIN)
    return [sys.executable, str(path)]


def test_a_group_skips_finished_runs_and_reports_a_failed_one_while_the_others_go_on(tmp_path):
    root = str(tmp_path / "sweep")
    runs = grid.plan(grid.parse_grid(["inner_lr=0.1,0.5,0.2"]), [0])
    lines = []
    info = grid.run_all(["--dataset=sinusoid"], runs, root, command=_fake(tmp_path),
                        say=lines.append)
    states = {n: s["state"] for n, s in info["runs"].items()}
    assert states == {"inner_lr=0.1/seed-0": "finished", "inner_lr=0.5/seed-0": "failed",
                      "inner_lr=0.2/seed-0": "finished"}
    assert "Non-finite meta-loss" in info["runs"]["inner_lr=0.5/seed-0"]["last_line"]
    code, text = grid.summary(info, root)
    assert code == 1 and "inner_lr=0.5/seed-0: Stopped: Non-finite meta-loss" in text
    assert json.load(open(os.path.join(root, "runs.json")))["runs"] == info["runs"]
    calls = open(os.path.join(root, "inner_lr=0.1/seed-0", "calls")).read()
    assert calls.split() == ["--dataset=sinusoid", "--inner_lr=0.1", "--seed=0",
                             f"--workdir={root}/inner_lr=0.1/seed-0"]
    # Again: the finished runs are skipped, the failed one is tried again.
    info = grid.run_all(["--dataset=sinusoid"], runs, root, command=_fake(tmp_path),
                        say=lines.append)
    assert info["runs"]["inner_lr=0.1/seed-0"]["state"] == "skipped: finished before"
    assert len(open(os.path.join(root, "inner_lr=0.1/seed-0", "calls")).readlines()) == 1
    assert len(open(os.path.join(root, "inner_lr=0.5/seed-0", "calls")).readlines()) == 2
    # A grid point that the check refuses never starts; the others run.

    def refuse(run):
        if "--inner_lr=-1" in run.flags:
            raise ConfigError("--inner_lr=-1 is invalid")
    info = grid.run_all([], grid.plan([("inner_lr", ["-1", "0.3"])], None), root,
                        command=_fake(tmp_path), say=lines.append, check=refuse)
    assert info["runs"]["inner_lr=-1"] == {"state": "failed", "error": "--inner_lr=-1 is invalid"}
    assert info["runs"]["inner_lr=0.3"]["state"] == "finished"


def test_a_stopped_sweep_resumes_without_redoing_its_finished_runs(tmp_path):
    root = str(tmp_path / "sweep")
    script = (f"import sys; sys.path.insert(0, {ROOT!r})\n"
              "from maml_tf import grid\n"
              "runs = grid.plan([('algorithm', ['maml', 'slow', 'protonet'])], None)\n"
              f"info = grid.run_all([], runs, {root!r}, command={_fake(tmp_path)!r})\n"
              "sys.exit(grid.summary(info, '.')[0])\n")
    sweep = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(root, "algorithm=slow", "training")):
        assert time.time() < deadline and sweep.poll() is None
        time.sleep(0.1)
    sweep.send_signal(signal.SIGTERM)
    assert sweep.wait(timeout=60) == 128 + signal.SIGTERM
    record = json.load(open(os.path.join(root, "runs.json")))["runs"]
    assert record["algorithm=maml"]["state"] == "finished"
    assert record["algorithm=slow"]["state"] == "stopped"
    assert record["algorithm=protonet"]["state"] == "not started"
    assert os.path.exists(os.path.join(root, "algorithm=slow", "ckpt"))   # it checkpointed
    # One SIGTERM per child, however long it takes to stop (the sweep used to repeat it every
    # 0.2 s, and a training run takes a second one as "stop at once, without a checkpoint").
    assert open(os.path.join(root, "algorithm=slow", "signals")).read() == "TERM\n"
    finished_at = os.path.getmtime(os.path.join(root, "algorithm=maml", "results.json"))
    again = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert os.path.getmtime(os.path.join(root, "algorithm=maml", "results.json")) == finished_at
    assert len(open(os.path.join(root, "algorithm=maml", "calls")).readlines()) == 1
    assert len(open(os.path.join(root, "algorithm=slow", "calls")).readlines()) == 2
    assert os.path.exists(os.path.join(root, "algorithm=protonet", "results.json"))


# -- the report over seeds -------------------------------------------------------------------
def _seed_run(root, name, seed, accuracy, task_ci, algorithm="maml", way=5, step=2000,
              rule=0):
    workdir = os.path.join(root, name)
    os.makedirs(workdir)
    config = Config(dataset="omniglot", algorithm=algorithm, way=way, shot=1, seed=seed,
                    num_iterations=60000 if rule else 2000, stop_when_flat=rule)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json())
    results = {
        "protocol": {"dataset": "omniglot", "algorithm": "maml", "way": 5, "shots": [1],
                     "queries": 1, "eval_mode": "transductive", "inner_steps": 3,
                     "num_tasks": 600, "checkpoint_step": step},
        "test": {"1shot": {"accuracy": {"mean": [0.2, accuracy], "ci95": [0.01, task_ci]},
                           "loss": {"mean": [1.6, 0.1], "ci95": [0.1, 0.01]}}},
        "train_seconds_this_session": 100.0, "iterations_this_session": 2000,
        "environment": {"cpu": "Some CPU", "cpu_count": 2, "accelerators": None},
    }
    if rule and step < 60000:
        results["stopped_when_flat"] = {"at_iteration": step, "last_rise": step - rule,
                                        "flat_iterations": rule, "stop_when_flat": rule,
                                        "metric": "accuracy"}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f)
    return workdir


def test_the_report_gives_runs_that_differ_by_seed_one_row_over_seeds(tmp_path, capsys):
    values = [0.95, 0.96, 0.98]
    for seed, v in enumerate(values):
        _seed_run(tmp_path / "maml", f"seed-{seed}", seed, v, 0.004 + 0.001 * seed)
    assert report.main(["report", str(tmp_path)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| Omniglot")]
    mean, half = seeds.seed_interval(values)
    assert len(lines) == 1 and "maml, 3 seeds" in lines[0]
    assert f"{100 * mean:.2f} ± {100 * half:.2f} % (3 seeds; tasks ± 0.50)" in lines[0]
    assert "5 min 0 s (3 sessions)" in lines[0]   # the seeds' wall time, summed
    assert report.main(["report", "--per_seed", str(tmp_path)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| Omniglot")]
    assert len(lines) == 4 and "maml, seed 2" in lines[3] and "98.00 ± 0.60 %" in lines[3]


def test_seeds_that_stop_when_flat_at_different_iterations_are_one_row_and_finished(
        tmp_path, capsys):
    # Two seeds ended by --stop_when_flat=10000 and one that ran to its 60,000 iterations.
    workdirs = [_seed_run(tmp_path / "maml", f"seed-{seed}", seed, 0.95, 0.005, step=step,
                          rule=10000) for seed, step in enumerate([12000, 15000, 60000])]
    assert all(grid.finished(w) for w in workdirs)
    assert report.main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("| Omniglot")]
    assert len(lines) == 1 and "maml, 3 seeds" in lines[0], lines
    assert "| 12,000-60,000 (stopped when flat) × " in lines[0] and report.FLAT_NOTE in out
    # Under another rule (the config changed since) the stopped seeds are not finished.
    other = _seed_run(tmp_path / "other", "seed-0", 0, 0.95, 0.005, step=12000, rule=5000)
    results = json.load(open(os.path.join(other, "results.json")))
    results["stopped_when_flat"]["stop_when_flat"] = 10000
    json.dump(results, open(os.path.join(other, "results.json"), "w"))
    assert not grid.finished(other)


def test_the_report_says_which_seed_groups_differ_beyond_their_spread(tmp_path, capsys):
    groups = {"maml": [0.95, 0.96, 0.98], "protonet": [0.97, 0.98, 0.96],
              "anil": [0.90, 0.91, 0.92]}
    for algorithm, values in groups.items():
        for seed, v in enumerate(values):
            _seed_run(tmp_path / algorithm, f"seed-{seed}", seed, v, 0.005, algorithm)
    for seed, v in enumerate(groups["anil"]):   # another cell: not compared with 5-way MAML
        _seed_run(tmp_path / "relation20", f"seed-{seed}", seed, v, 0.005, "relation", 20)
    assert report.main(["report", "--compare=maml", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Differences to maml (3 seeds)" in out
    rows = {ln.split(" | ")[0]: ln for ln in out.splitlines() if ln.startswith("| anil, ") or
            ln.startswith("| protonet, ")}
    assert set(rows) == {"| anil, 3 seeds", "| protonet, 3 seeds"}   # not maml against itself
    table, differences = out.split("Differences to maml")
    assert "| Omniglot 20-way 1-shot | relation, 3 seeds |" in table
    assert "relation" not in differences
    for algorithm in ("anil", "protonet"):
        diff, half, df = seeds.difference_interval(groups[algorithm], groups["maml"])
        sign = "+" if diff >= 0 else "−"
        assert f"{sign}{100 * abs(diff):.2f} ± {100 * half:.2f} % (df {df:.1f}" in \
            rows[f"| {algorithm}, 3 seeds"]
    assert "beyond the seed spread" in rows["| anil, 3 seeds"]        # −6 points, spread ~2
    assert "within it" in rows["| protonet, 3 seeds"]                 # +0.67 points
    assert report.main(["report", "--compare=reptile", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "--compare=reptile must name exactly one group" in err and "anil, maml, protonet, relation" in err


# -- a real sweep: python -m maml_tf.sweep, its report and its HParams ------------------------
def test_a_sweep_trains_each_point_and_seed_reports_them_and_writes_hparams(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.hparams import metadata

    root = tmp_path / "family"
    command = [sys.executable, "-m", "maml_tf.sweep", "--dataset=sinusoid", "--num_iterations=2",
               "--meta_batch_size=2", "--eval_tasks=4", "--val_tasks=2", "--log_every=1",
               "--eval_every=2", "--checkpoint_every=2", "--nojit_compile",
               "--step_metrics_every=1", "--grid=inner_lr=0.01,0.02", "--seeds=2",
               f"--workdir={root}"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    sweep = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=900)
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    assert "4 of 4 runs finished" in sweep.stdout
    runs = sorted(glob.glob(str(root / "inner_lr=*" / "seed-*" / "results.json")))
    assert len(runs) == 4
    config = json.load(open(root / "inner_lr=0.02" / "seed-1" / "config.json"))
    assert config["learner"]["inner_lr"] == 0.02 and config["run"]["seed"] == 1
    table = subprocess.run([sys.executable, "-m", "maml_tf.report", str(root)], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=300).stdout
    rows = [ln for ln in table.splitlines() if ln.startswith("| sinusoid")]
    assert len(rows) == 2 and all("maml, 2 seeds" in r and "(2 seeds; tasks ±" in r
                                  for r in rows), table
    # TensorBoard's own reader finds each run's hparams (its flags) at the workdir's root.
    workdir = root / "inner_lr=0.02" / "seed-1"
    events = event_accumulator.EventAccumulator(str(workdir), size_guidance={"tensors": 0})
    events.Reload()
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG]
    info = metadata.parse_session_start_info_plugin_data(content)
    hparams = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
               for k, v in info.hparams.items()}
    assert hparams["inner_lr"] == pytest.approx(0.02) and hparams["seed"] == 1
    assert hparams["dataset"] == "sinusoid" and "way" not in hparams
    test = event_accumulator.EventAccumulator(str(workdir / "eval"), size_guidance={"tensors": 0})
    test.Reload()
    assert "test_1shot/loss/step_1" in test.Tags()["tensors"]
    # The same command again: every run finished, none trains again.
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and again.stdout.count("finished before, skipped") == 4


def test_a_flagfile_axis_gives_each_point_its_flagfile_before_the_commands_flags(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"omniglot_{name}.cfg").write_text(f"--dataset=sinusoid\n--inner_lr=0.{len(name)}\n")
    axes = grid.parse_grid([f"flagfile={tmp_path}/omniglot_*.cfg"])
    runs = grid.plan(axes, [0])
    assert [r.name for r in runs] == ["flagfile=omniglot_a/seed-0", "flagfile=omniglot_b/seed-0"]
    assert runs[0].flagfile == str(tmp_path / "omniglot_a.cfg") and runs[0].flags == ("--seed=0",)
    root = str(tmp_path / "sweep")
    grid.run_all(["--num_iterations=3"], runs, root, command=_fake(tmp_path), say=lambda s: None)
    call = open(os.path.join(root, "flagfile=omniglot_b/seed-0", "calls")).read().split()
    assert call[:3] == [f"--flagfile={tmp_path}/omniglot_b.cfg", "--num_iterations=3", "--seed=0"]
    with pytest.raises(ConfigError, match="no flagfile"):
        grid.parse_grid([f"flagfile={tmp_path}/nothing_*.cfg"])
