"""The training loop end to end: artifacts, resume, workdir identity, NaN, flagfiles."""

import glob
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

from maml_tf import flags as maml_flags
from maml_tf import api, harness, supervised, train_step as train_step_lib
from maml_tf.config import Config, ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = {"num_iterations": 4, "log_every": 2, "eval_every": 2, "checkpoint_every": 2,
         "eval_tasks": 10, "val_tasks": 4, "meta_batch_size": 2, "eval_shots": [3, 5],
         "eval_inner_steps": 2,
         # One program per run: meta-steps with and without per-step metrics compile
         # apart (the resume and distribute tests run both).
         "step_metrics_every": 1}


def smoke(**kw) -> Config:
    return Config.from_dict({**SMOKE, **kw})


def weights_of(workdir):
    config = Config.from_dict(json.load(open(os.path.join(workdir, "config.json"))))
    r = api.build(config, workdir)
    harness.checkpointing.restore_or_init(r.manager)
    return [v.numpy() for v in r.learner.net.variables], int(r.step.numpy())


def test_sinusoid_run_writes_events_checkpoints_flags_and_results(tmp_path):
    workdir = str(tmp_path / "run")
    results = api.train(smoke(), workdir)
    assert glob.glob(os.path.join(workdir, "train", "events.out.tfevents*"))
    assert glob.glob(os.path.join(workdir, "eval", "events.out.tfevents*"))
    assert os.path.exists(os.path.join(workdir, "checkpoints", "ckpt-4.index"))
    saved = json.load(open(os.path.join(workdir, "results.json")))
    assert saved["protocol"]["num_tasks"] == 10 and saved["protocol"]["checkpoint_step"] == 4
    assert set(saved["test"]) == {"3shot", "5shot"}
    assert len(saved["test"]["5shot"]["loss"]["mean"]) == 3   # 0, 1, 2 inner steps
    assert results["test"]["3shot"]["loss"]["ci95"][0] > 0
    # flags.cfg re-creates the same experiment.
    values = flags.FLAGS
    values(["prog", f"--flagfile={os.path.join(workdir, 'flags.cfg')}"])
    try:
        assert maml_flags.config_from_flags(values) == smoke()
        assert values.workdir == workdir
    finally:
        values.unparse_flags()


def test_resume_continues_and_matches_an_uninterrupted_run_bitwise(tmp_path):
    # Per-step metrics on iterations 2, 3, 4 and 6 only: the resumed session starts with a
    # meta-step that scores the last inner step only, and compiles both programs first.
    smoke_mixed = lambda n: smoke(num_iterations=n, step_metrics_every=3)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    api.train(smoke_mixed(6), straight)
    api.train(smoke_mixed(4), resumed)
    api.train(smoke_mixed(6), resumed)   # resumes at 4
    (w1, s1), (w2, s2) = weights_of(straight), weights_of(resumed)
    assert s1 == s2 == 6
    for a, b in zip(w1, w2):
        np.testing.assert_array_equal(a, b)


def test_a_workdir_with_different_flags_is_refused_unless_overwrite(tmp_path):
    workdir = str(tmp_path / "run")
    api.train(smoke(num_iterations=2), workdir)
    with pytest.raises(ConfigError, match=r"different flags \(inner_lr: 0.01 -> 0.02\)"):
        api.train(smoke(num_iterations=2, inner_lr=0.02), workdir)
    api.train(smoke(num_iterations=2, inner_lr=0.02), workdir, overwrite=True)
    aside = glob.glob(os.path.join(workdir, "replaced-*", "checkpoints", "ckpt-2.index"))
    assert aside, "the old run's checkpoint must be moved aside, not deleted"


def test_non_finite_meta_loss_fails_naming_the_window_and_saves_no_nan(tmp_path):
    workdir = str(tmp_path / "run")
    with pytest.raises(harness.NonFiniteError, match=r"at iteration 1 \(logging window 1..1"):
        api.train(smoke(inner_lr=1e30, checkpoint_every=1), workdir)
    assert not glob.glob(os.path.join(workdir, "checkpoints", "ckpt-*"))
    skipped = str(tmp_path / "skip")
    api.train(smoke(inner_lr=1e30, on_nan="skip"), skipped)
    weights, step = weights_of(skipped)
    assert step == 4 and all(np.all(np.isfinite(w)) for w in weights)


def _smoke_overrides(cfg) -> dict:
    """Flags that shrink a flagfile's run to a smoke run: 2 iterations and one task per task
    chunk, keeping its data, model, algorithm and switches. (The paper-sized meta-batches took
    up to 8.3 GB each here: Omniglot 20w5s, 16 tasks, no XLA.)"""
    values = flags.FLAGS
    values(["prog"] + maml_flags.expand_flagfiles([f"--flagfile={cfg}"]))
    try:
        config = maml_flags.config_from_flags(values)
    finally:
        values.unparse_flags()
    overrides = {"num_iterations": 2, "eval_tasks": 2, "val_tasks": 2, "log_every": 1,
                 "eval_every": 2, "checkpoint_every": 2, "jit_compile": "false",
                 # One task per chunk; 2 tasks where the count is chosen (--task_chunks=0).
                 "meta_batch_size": config.task_chunks or 2}
    if config.is_rl:
        # A few short episodes: the smoke run checks the path, not the policy.
        overrides.update(meta_batch_size=2, trajectories=2, eval_trajectories=2, horizon=10)
    if config.dataset == "mini_imagenet":
        # 84x84 images: one second-order ResNet-12 task with 15 queries takes ~10 GB and 20 s
        # here, a Conv-4 one with 5 steps most of the suite's slowest minute and a half.
        # 1 task, 1 query and 1 inner step check the same path.
        overrides.update(meta_batch_size=1, task_chunks=1, query=1, inner_steps=1,
                         eval_inner_steps=1)
    return config, overrides


FLAGFILES = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "runs", "*.cfg"))
                   if not p.endswith("_common.cfg"))


def _one_per_kind(files) -> list:
    """One flagfile per (data set, model), the one with the fewest way x shot (then the first
    by name: the plain MAML cell). The others differ in algorithm, way, shot and schedule:
    every flagfile's parse checks those values, every algorithm's learner trains in
    learner_contract_test.py and each kind of outer update through the same ``api.train``
    in test_each_kind_of_outer_update_trains_compiled_and_shows_its_state, so a smoke run of
    each through the entry point tested no further path (24 such runs, two at a
    time, were part of a suite that took 35 minutes; the 7 left take 2 minutes here)."""
    best = {}
    for cfg in files:
        config, _ = _smoke_overrides(cfg)
        key = (config.dataset, config.model_name)
        best[key] = min(best.get(key, (math.inf, "")), (config.way * config.shot, cfg))
    return sorted(cfg for _, cfg in best.values())


RUN_FLAGFILES = _one_per_kind(FLAGFILES)


def _has_mujoco() -> bool:
    import importlib.util
    return all(importlib.util.find_spec(m) is not None for m in ("gymnasium", "mujoco"))


@pytest.fixture(scope="module")
def flagfile_runs(tmp_path_factory, request):
    """Every flagfile's smoke run, through the entry point in its own process, two at a time
    (the test process only waits, and the machine has two cores): ``{cfg: future of
    (returncode, stderr, workdir)}``, or a skip reason where its data set is absent. In
    subprocesses because 27 different networks and shapes built in the test process would pile
    up there (the suite reports its peak memory, conftest.py). The mini-ImageNet runs (84x84
    images) go one after the other in a lane of their own: side by side, beside a test process
    of 3.2 GB, they took the suite's processes to 6.9 GB (RSS) in session 23."""
    from concurrent.futures import ThreadPoolExecutor
    from conftest import MINI_IMAGENET_DIR, OMNIGLOT_DIR
    data_dirs = {"omniglot": OMNIGLOT_DIR, "mini_imagenet": MINI_IMAGENET_DIR}
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "MAML_TF_OFFLINE": "1"}

    def run(cfg, overrides, workdir):
        proc = subprocess.run([sys.executable, "-m", "maml_tf.train", f"--flagfile={cfg}",
                               f"--workdir={workdir}"]
                              + [f"--{k}={v}" for k, v in overrides.items()],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        return proc.returncode, proc.stderr, workdir

    selected = [item.callspec.params["cfg"] for item in request.session.items
                if getattr(item, "originalname", "") == "test_each_kind_of_flagfile_runs_two_iterations"]
    runs = {}
    with ThreadPoolExecutor(max_workers=1) as mini_imagenet, ThreadPoolExecutor(max_workers=1) as other:
        for cfg in selected:
            config, overrides = _smoke_overrides(cfg)
            if config.dataset.startswith("halfcheetah") and not _has_mujoco():
                runs[cfg] = (f"--dataset={config.dataset} needs gymnasium with MuJoCo, which is "
                             "not installed (pip install -e \".[rl]\")")
                continue
            if config.dataset in data_dirs:
                if not os.path.isdir(data_dirs[config.dataset]):
                    runs[cfg] = f"{config.dataset} not found at {data_dirs[config.dataset]}"
                    continue
                overrides["data_dir"] = os.path.abspath(data_dirs[config.dataset])
            workdir = tmp_path_factory.mktemp("flagfile") / "run"
            lane = mini_imagenet if config.dataset == "mini_imagenet" else other
            runs[cfg] = lane.submit(run, cfg, overrides, workdir)
        yield runs


@pytest.mark.parametrize("cfg", FLAGFILES)
def test_every_flagfile_parses_to_a_valid_config(cfg):
    config, _ = _smoke_overrides(cfg)     # raises ConfigError on a bad value or combination
    # (The random-initialisation baseline of RL meta-trains for 0 iterations.)
    assert config.num_iterations >= 0 and config.eval_tasks > 0


@pytest.mark.parametrize("cfg", RUN_FLAGFILES)
def test_each_kind_of_flagfile_runs_two_iterations(cfg, flagfile_runs):
    run = flagfile_runs[cfg]
    if isinstance(run, str):
        pytest.skip(run + ("" if "gymnasium" in run else
                           ": set MAML_TF_DATA_DIR / MAML_TF_MINI_IMAGENET_DIR to run it."))
    returncode, stderr, workdir = run.result()
    assert returncode == 0, stderr[-3000:]
    results = json.load(open(workdir / "results.json"))
    assert results["protocol"]["checkpoint_step"] == 2


def test_tensorflow_start_up_notices_are_shown_once():
    # TF 2.21 prints them twice, once per native library; the same notice differs by its
    # time stamp only.
    proc = subprocess.run([sys.executable, "-c", "import maml_tf"], cwd=ROOT,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0"},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for notice in ("All log messages before absl::InitializeLog()", "oneDNN custom operations"):
        assert proc.stderr.count(notice) <= 1, proc.stderr


def test_entry_point_reports_bad_flags_clearly(tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    bad = subprocess.run([sys.executable, "-m", "maml_tf.train", f"--workdir={tmp_path}",
                          "--dataset=sinusoid", "--model=conv4"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "--model=conv4 is an image model" in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "maml_tf.train", f"--workdir={tmp_path}",
                              "--flagfile=runs/nope.cfg"], cwd=ROOT, env=env,
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "runs/nope.cfg" in missing.stderr


def _tags(directory):
    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(directory, size_guidance={"tensors": 0, "images": 0})
    acc.Reload()
    return set(acc.Tags()["tensors"]), set(acc.Tags()["images"]) | {
        t for t in acc.Tags()["tensors"] if "fit" in t}


def test_tensorboard_gets_per_step_metrics_rates_and_the_sinusoid_figure(tmp_path):
    workdir = str(tmp_path / "run")
    api.train(smoke(), workdir)
    scalars, images = _tags(os.path.join(workdir, "train"))
    for tag in ("meta_loss", "query_loss/step_0", "query_loss/step_1", "grad_norm",
                "learning_rate", "tasks_per_sec", "nonfinite", "val_3shot/loss/step_2",
                "val_3shot/loss_ci95/step_2"):
        assert tag in scalars, (tag, sorted(scalars))
    assert "sinusoid_fit" in images
    eval_scalars, _ = _tags(os.path.join(workdir, "eval"))
    assert "test_5shot/loss/step_2" in eval_scalars


def test_per_step_metrics_come_from_one_meta_step_in_n_and_every_logged_one(tmp_path):
    import tensorflow as tf
    from maml_tf import metrics as metrics_lib
    schedule = supervised.Schedule(smoke(num_iterations=9, log_every=4, step_metrics_every=3))
    assert [s for s in range(1, 10) if schedule.step_metrics(s)] == [3, 4, 6, 8, 9]
    # The other program is compiled up front only where a later iteration runs it.
    maml = api.build(smoke(), str(tmp_path / "maml")).learner
    assert [schedule.other_program_follows(maml, s) for s in (1, 6, 8, 9)] == [
        True, True, False, False]
    once = supervised.Schedule(smoke(num_iterations=1, log_every=4, step_metrics_every=3))
    assert not once.other_program_follows(maml, 1)
    protonet = api.build(smoke(dataset="omniglot", algorithm="protonet", num_filters=4),
                                str(tmp_path / "protonet")).learner
    assert not schedule.other_program_follows(protonet, 1)   # one program only
    window = metrics_lib.TrainMetrics(inner_steps=1, regression=False)
    scalar = lambda v: tf.constant(v, tf.float32)
    base = lambda loss: {"loss": scalar(loss), "grad_norm": scalar(1.0), "nonfinite": scalar(0.0)}
    window.update({**base(1.0), "step_loss": scalar([2.0, 1.0]),
                   "step_accuracy": scalar([0.2, 0.9])})
    window.update(base(4.0))      # a meta-step that scored the last inner step only
    window.update({**base(1.0), "step_loss": scalar([4.0, 0.5]),
                   "step_accuracy": scalar([0.4, 0.7])})
    values = window.write(step=3, steps_in_window=3, tasks_per_step=2, total_steps=9, lr=0.1)
    assert values["meta_loss"] == 2.0                       # all three meta-steps
    assert values["query_loss/step_0"] == 3.0               # the two that scored every step
    np.testing.assert_allclose(values["query_accuracy/step_1"], 0.8)
    window.update(base(5.0))      # a window with none writes no per-step values
    values = window.write(step=4, steps_in_window=1, tasks_per_step=2, total_steps=9, lr=0.1)
    assert values["meta_loss"] == 5.0 and not any(k.startswith("query_") for k in values)


def _values(directory, tag):
    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(directory, size_guidance={"tensors": 0})
    acc.Reload()
    return [e.step for e in acc.Tensors(tag)]


def test_evaluation_never_changes_the_run_and_names_its_own_results(tmp_path):
    workdir = str(tmp_path / "run")
    first = api.train(smoke(), workdir)["test"]
    files = ("config.json", "flags.cfg", "results.json")
    before = {f: open(os.path.join(workdir, f), "rb").read() for f in files}
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}

    def evaluate(*args):
        proc = subprocess.run([sys.executable, "-m", "maml_tf.evaluate", f"--workdir={workdir}",
                               *args], cwd=ROOT, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
    evaluate()                      # the training's protocol: the same numbers
    evaluate()                      # again: no second TensorBoard value
    evaluate("--eval_inner_steps=3", "--eval_shots=5", "--eval_tasks=6")
    assert {f: open(os.path.join(workdir, f), "rb").read() for f in files} == before
    same = api.results_name(smoke(), 4)
    again = json.load(open(os.path.join(workdir, same + ".json")))
    assert again["test"] == json.loads(json.dumps(first))
    other = json.load(open(os.path.join(
        workdir, "results-step4-6tasks-3steps-5shot-10queries-transductive-seed1234.json")))
    assert other["protocol"]["inner_steps"] == 3 and other["protocol"]["num_tasks"] == 6
    assert len(other["test"]["5shot"]["loss"]["mean"]) == 4 and set(other["test"]) == {"5shot"}
    assert _values(os.path.join(workdir, "eval"), "test_5shot/loss/step_2") == [4]
    assert _values(os.path.join(workdir, "eval", same), "test_5shot/loss/step_2") == [4]
    # A setting that is not an evaluation setting is refused, naming the allowed ones.
    with pytest.raises(ConfigError, match=r"--inner_lr cannot change at evaluation"):
        api.evaluate_workdir(workdir, inner_lr=0.5)


def test_results_explain_themselves(tmp_path):
    results = api.train(smoke(), str(tmp_path / "run"))
    assert "after i inner steps" in results["legend"]["index"]
    assert results["legend"]["loss"] == "mean squared error per query point"
    assert {"diverged", "finite_mean", "ci95"} <= set(results["legend"])
    assert results["protocol"]["inner_steps"] == 2 and results["protocol"]["train_inner_steps"] == 1
    env = results["environment"]
    assert env["tensorflow"] and env["maml_tf"] and env["cpu"] and env["replicas"] == 1
    assert env["git"] is None or len(env["git"]["commit"]) == 40


def test_the_chosen_split_is_written_to_the_workdir(omniglot_dir, tmp_path):
    config = Config.from_dict({"dataset": "omniglot", "data_dir": omniglot_dir, "split": "vinyals",
                               "num_filters": 8, "meta_batch_size": 2, "num_iterations": 1,
                               "eval_tasks": 2, "val_tasks": 2, "jit_compile": False})
    api.train(config, str(tmp_path))
    split = json.load(open(os.path.join(tmp_path, "split.json")))
    assert split["split"] == "vinyals" and len(split["train"]) == 1028 and len(split["test"]) == 423


# One algorithm per kind of outer update (second-order MAML, Reptile's weight difference,
# an embedding learner without inner steps, supervised pre-training) and those that log state
# of their own. (FOMAML and ANIL take MAML's path with a switch: learner_contract_test.py.)
# Plain MAML is not listed: Meta-SGD runs its outer update plus learned rates, and the flagfile
# test above trains omniglot_5w1s.cfg (MAML) compiled through the same api.train.
ALGORITHM_STATE_TAGS = {
    "protonet": [], "pretrain": [], "reptile": [],
    "metasgd": ["metasgd_lr_mean/conv4_conv0_kernel", "metasgd_lr_mean/conv4_head_bias"],
    "mamlpp": ["lslr/conv4_conv0_kernel/step_0", "lslr/conv4_head_bias/step_1",
               "msl_weight/step_1", "msl_weight/step_2", "bnwb/conv4_batchnorm0_gamma",
               "bnrs/bnrs_mean0"],
}


@pytest.mark.isolated
@pytest.mark.parametrize("algorithm", sorted(ALGORITHM_STATE_TAGS))
def test_each_kind_of_outer_update_trains_compiled_and_shows_its_state(algorithm, omniglot_dir, tmp_path):
    # MAML++ without derivative-order annealing: its switch (algorithms_test.py) would only
    # add a second compile of the step here.
    extra = {"mamlpp": {"lslr": True, "bnwb": True, "bnrs": True, "msl_iterations": 2,
                        "meta_lr_schedule": "cosine"},
             "reptile": {"inner_optimizer": "adam", "meta_optimizer": "sgd", "meta_lr": 1.0,
                         "meta_lr_schedule": "linear"}}.get(algorithm, {})
    config = Config.from_dict({"dataset": "omniglot", "data_dir": omniglot_dir, "way": 3,
                               "shot": 1, "num_filters": 8, "inner_steps": 2,
                               "algorithm": algorithm, "inner_lr": 0.1, "meta_batch_size": 2,
                               "num_iterations": 3, "log_every": 1, "eval_every": 3,
                               "checkpoint_every": 3, "eval_tasks": 4, "val_tasks": 2, **extra})
    workdir = str(tmp_path / algorithm)
    results = api.train(config, workdir)
    accuracy = results["test"]["1shot"]["accuracy"]["mean"]
    assert len(accuracy) == (1 if algorithm == "protonet" else 3)
    assert all(np.isfinite(accuracy))
    scalars, _ = _tags(os.path.join(workdir, "train"))
    for tag in ["meta_loss", "learning_rate", "query_accuracy/step_0"] + ALGORITHM_STATE_TAGS[algorithm]:
        assert tag in scalars, (tag, sorted(scalars))


@pytest.mark.isolated
@pytest.mark.parametrize("algorithm", ["maml", "reptile", "protonet"])
def test_task_chunks_give_the_same_step(algorithm, tmp_path):
    # Chunks of tasks run one after another in a while loop: only memory may change.
    import tensorflow as tf
    from maml_tf.data.episode import Episode
    # Without XLA: the chunks' while loop is the same either way, and the two compiles took
    # most of this test's 20-50 s.
    base = {"dataset": "omniglot", "way": 3, "shot": 1, "num_filters": 8, "inner_steps": 2,
            "algorithm": algorithm, "inner_lr": 0.1, "meta_batch_size": 4, "jit_compile": False}
    rng = np.random.default_rng(0)
    episode = Episode(tf.constant(rng.uniform(size=(4, 3, 28, 28, 1)).astype("float32")),
                      tf.constant(np.tile([0, 1, 2], (4, 1)).astype("int32")),
                      tf.constant(rng.uniform(size=(4, 3, 28, 28, 1)).astype("float32")),
                      tf.constant(np.tile([0, 1, 2], (4, 1)).astype("int32")))
    results = []
    for chunks in (1, 2):
        r = api.build(Config.from_dict({**base, "task_chunks": chunks}),
                             str(tmp_path / f"c{chunks}"))
        out = train_step_lib.make_train_step(r)(episode)
        results.append((out, [v.numpy() for v in r.learner.meta_variables]))
    (a, wa), (b, wb) = results
    np.testing.assert_allclose(float(a["loss"]), float(b["loss"]), rtol=1e-5)
    np.testing.assert_allclose(a["step_accuracy"].numpy(), b["step_accuracy"].numpy(), atol=1e-6)
    np.testing.assert_allclose(float(a["grad_norm"]), float(b["grad_norm"]), rtol=1e-4)
    for x, y in zip(wa, wb):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_task_chunks_must_divide_the_replica_batch(tmp_path):
    with pytest.raises(ConfigError, match="--task_chunks=3 does not divide the 4 tasks"):
        api.build(Config.from_dict({**SMOKE, "meta_batch_size": 4, "task_chunks": 3}),
                         str(tmp_path / "run"))


def test_task_chunks_auto_fit_a_chunk_into_the_cache_and_are_chosen_again_on_resume(
        tmp_path, monkeypatch):
    from maml_tf import distribute
    from maml_tf.models import zoo
    config = Config(dataset="omniglot", way=5, shot=1, meta_batch_size=32)
    model = zoo.conv4((28, 28, 1), 5)
    per_example = distribute.activation_bytes_per_example(model)
    # Every layer's output once: 4 blocks of conv, norm and ReLU maps (14, 7, 4, 2 pixels
    # square, 64 channels), the pooled 64 features and 5 logits, in float32.
    assert per_example == 4 * (3 * 64 * (14 ** 2 + 7 ** 2 + 4 ** 2 + 2 ** 2) + 64 + 5)
    per_task = per_example * 10                       # 5 support + 5 query examples
    strategy = distribute.make_strategy(config)
    # A chunk's activations fit a quarter of the cache: 4 tasks in 32 MiB here.
    for cache, chunks in ((4 * 4 * per_task, 8), (4 * 4 * per_task - 4, 16),
                          (4 * 16 * per_task, 2), (10 ** 12, 1),
                          (32 << 20, 8)):
        monkeypatch.setattr(distribute, "cpu_cache_bytes", lambda: cache)
        assert distribute.choose_task_chunks(config, model, strategy) == chunks, cache
    # Not even one task fits: chunks would only serialise the work, so all tasks at once.
    monkeypatch.setattr(distribute, "cpu_cache_bytes", lambda: 4 * per_task - 4)
    assert distribute.choose_task_chunks(config, model, strategy) == 1
    # A run records 0 (auto) and uses the chosen count.
    monkeypatch.setattr(distribute, "cpu_cache_bytes", lambda: 4 * 2 * per_task)
    r = api.build(Config.from_dict({**SMOKE, "dataset": "omniglot", "way": 5,
                                           "shot": 1, "num_filters": 64, "meta_batch_size": 4,
                                           "task_chunks": 0}), str(tmp_path / "run"))
    assert r.config.task_chunks == 2
    assert json.load(open(tmp_path / "run" / "config.json"))["optim"]["task_chunks"] == 0


def test_console_says_when_it_compiles_and_tensorboard_groups_the_inner_steps(tmp_path, caplog):
    import logging as py_logging
    workdir = str(tmp_path / "run")
    with caplog.at_level(py_logging.INFO, logger="absl"):
        api.train(smoke(), workdir)
    assert "Compiling the meta-step" in caplog.text and "Compiled the meta-step in" in caplog.text
    # Once per test shot (the smoke run validates 3- and 5-shot tasks), at the first validation.
    assert caplog.text.count("Compiling the evaluation step for") == 2
    assert "Compiling the evaluation step for 3-shot tasks with XLA (the first validation" in caplog.text
    tensors, _ = _tags(os.path.join(workdir, "train"))
    assert "custom_scalars__config__" in tensors


def test_a_curve_of_one_validation_point_shows_the_point(tmp_path):
    import matplotlib.image
    from maml_tf import plots
    path = str(tmp_path / "curve.png")
    plots.learning_curve([100], [0.5], [0.1], "one point", "accuracy", path)
    rgb = matplotlib.image.imread(path)[..., :3]
    blue = (rgb[..., 2] > 0.7) & (rgb[..., 0] < 0.3) & (rgb[..., 1] < 0.3)
    assert blue.sum() > 10


def test_the_last_rise_of_a_curve_is_beyond_the_ci_of_the_best_before_it():
    from maml_tf import plots
    steps = [1000, 2000, 3000, 4000, 5000, 6000]
    # 2000 beats 0.50 +- 0.05; 3000 is within 0.60's CI; 4000 beats the best (0.62 +- 0.04)
    # by more than its CI; 5000 is a new best but within 0.67's CI; 6000 falls.
    means = [0.50, 0.60, 0.62, 0.67, 0.69, 0.55]
    cis = [0.05, 0.04, 0.04, 0.03, 0.03, 0.03]
    assert plots.last_rise(steps, means, cis) == 4000
    # The best moved to 0.69 at 5000: a rise must beat 0.69 + 0.03, not 0.67 + 0.03.
    assert plots.last_rise(steps + [7000], means + [0.715], cis + [0.03]) == 4000
    assert plots.last_rise(steps + [7000], means + [0.725], cis + [0.03]) == 7000
    # A loss falls: the same curve mirrored.
    assert plots.last_rise(steps, [-m for m in means], cis, higher_is_better=False) == 4000
    assert plots.last_rise([], [], []) is None


def test_flat_for_counts_the_iterations_since_the_last_rise_of_the_run_s_own_metric():
    from maml_tf import plots
    curve = [{"step": s, "accuracy": m, "accuracy_ci95": 0.04}
             for s, m in [(1000, 0.5), (2000, 0.6), (3000, 0.61), (4000, 0.62)]]
    assert plots.flat_for(curve) == (2000, 2000)
    # A loss (regression) falls, a return (RL) rises.
    loss = [{"step": h["step"], "loss": -h["accuracy"], "loss_ci95": 0.04} for h in curve]
    assert plots.flat_for(loss) == (2000, 2000)
    ret = [{"step": h["step"], "return": h["accuracy"], "return_ci95": 0.04} for h in curve]
    assert plots.flat_for(ret + [{"step": 5000, "return": 0.7, "return_ci95": 0.04}]) == (5000, 0)
    assert plots.flat_for([]) == (None, 0)


def test_stop_when_flat_ends_training_counts_as_finished_and_stays_ended(tmp_path):
    from maml_tf import grid, report, run_records
    # A meta-learning rate of 1e-12 keeps the validation curve flat from its first point
    # (iteration 1): a rule of 3 iterations ends the run at iteration 4 of 20.
    config = smoke(num_iterations=20, eval_every=1, checkpoint_every=10, meta_lr=1e-12,
                   stop_when_flat=3, eval_shots=[])
    workdir = str(tmp_path / "run")
    results = api.train(config, workdir)
    assert results["stopped_when_flat"] == {"at_iteration": 4, "last_rise": 1,
                                            "flat_iterations": 3, "stop_when_flat": 3,
                                            "metric": "loss"}
    assert results["protocol"]["checkpoint_step"] == 4 and results["iterations_this_session"] == 4
    assert os.path.exists(os.path.join(workdir, "checkpoints", "ckpt-4.index"))
    history = json.load(open(os.path.join(workdir, "history.json")))
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert grid.finished(workdir)
    row = report.table(run_records.read_runs([workdir]))
    assert "4 (stopped when flat) × 2" in row, row
    # The same command trains no further; a looser rule (resumable) trains on.
    again = api.train(config, workdir)
    assert again["iterations_this_session"] == 0 and again["stopped_when_flat"]["at_iteration"] == 4
    looser = api.train(config.replace(stop_when_flat=5), workdir)
    assert looser["iterations_this_session"] == 2
    assert looser["stopped_when_flat"]["at_iteration"] == 6 and grid.finished(workdir)
    # Without the rule the run trains on to --num_iterations, and results.json drops the record.
    api.train(config.replace(stop_when_flat=0, num_iterations=7), workdir)
    assert grid.finished(workdir)
    assert "stopped_when_flat" not in json.load(open(os.path.join(workdir, "results.json")))


@pytest.mark.parametrize("fixture, first", [("flat_config_sinusoid.json", 2),
                                            ("flat_config_navigation_2d.json", 1)])
def test_a_workdir_whose_config_json_is_flat_resumes_and_evaluates(tmp_path, fixture, first):
    # config.json as the code before the config's sections wrote it (tests/fixtures).
    with open(os.path.join(os.path.dirname(__file__), "fixtures", fixture)) as f:
        flat = json.load(f)
    workdir = str(tmp_path / "run")
    api.train(Config.from_dict({**flat, "num_iterations": first}), workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(flat, f)
    results = api.train(Config.from_dict(flat), workdir)   # the same command, resumed
    assert results["iterations_this_session"] == flat["num_iterations"] - first
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(flat, f)
    evaluated = api.evaluate_workdir(workdir, eval_tasks=2)
    assert evaluated["protocol"]["checkpoint_step"] == flat["num_iterations"]
    assert evaluated["protocol"]["num_tasks"] == 2
