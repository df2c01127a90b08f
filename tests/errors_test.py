"""Errors a user can cause: one paragraph naming the problem and the fix, found before
training where they can be, never a traceback (unless --verbosity=1)."""

import logging
import os
import shutil
import subprocess
import sys

import pytest

from maml_tf import api, checkpointing, harness, metrics
from maml_tf.config import Config, ConfigError
from maml_tf.data import omniglot
from maml_tf.data.errors import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--num_iterations=2", "--meta_batch_size=2", "--eval_tasks=4", "--val_tasks=2",
        "--eval_every=2", "--log_every=1", "--checkpoint_every=2"]   # log_every: one program


def _train(tmp_path, *args, env=None, command="maml_tf.train"):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "MAML_TF_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", command, f"--workdir={tmp_path / 'run'}",
                           *(FAST if command == "maml_tf.train" else []), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--eval_shots=5,abc"], "--eval_shots=5,abc is invalid: it must be a comma-separated list"),
    (["--seed=-1"], "--seed=-1 is invalid"),
    (["--cpu_devices=2"], "with the default strategy it does nothing"),
    (["--inner_lr=1e30"], "Stopped: Non-finite meta-loss"),
    (["--dataset=omniglot", "--data_source=npz", "--data_dir=/nonexistent"], "Data error"),
    (["--flagfile=runs/no_such_cell.cfg"], "--flagfile=runs/no_such_cell.cfg: no such file."),
])
def test_the_entry_point_prints_one_paragraph_without_a_traceback(tmp_path, args, message):
    out = _train(tmp_path, "--dataset=sinusoid", *args)
    assert out.returncode != 0
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


def test_verbosity_1_shows_the_traceback(tmp_path):
    out = _train(tmp_path, "--dataset=sinusoid", "--inner_lr=1e30", "--verbosity=1")
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_replicas_that_do_not_divide_the_evaluation_tasks_fail_before_training(tmp_path):
    # A fresh process: --cpu_devices must act before TensorFlow initialises its devices.
    out = _train(tmp_path, "--dataset=sinusoid", "--strategy=mirrored", "--cpu_devices=2",
                 "--eval_tasks=5")
    assert out.returncode != 0
    assert "--eval_tasks=5 cannot be split evenly over the 2" in out.stderr, out.stderr[-2000:]
    assert not os.path.exists(tmp_path / "run" / "train")   # no iteration ran


def test_too_many_classes_for_the_test_split_fail_before_training(tmp_path, omniglot_dir):
    config = Config.from_dict({"dataset": "omniglot", "data_dir": omniglot_dir, "way": 500,
                               "meta_batch_size": 1, "num_iterations": 2, "eval_tasks": 2,
                               "val_tasks": 2})
    with pytest.raises(DataError, match=r"The val split of omniglot has \d+ classes"):
        api.train(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "train")   # no iteration ran
    # The corrected command may use the workdir: nothing of a run is in it to lose.
    checkpointing.prepare_workdir(str(tmp_path / "run"), config.replace(way=5))
    assert harness.read_config(str(tmp_path / "run")).way == 5


def test_a_workdir_that_trained_still_refuses_other_flags(tmp_path):
    workdir = str(tmp_path / "run")
    checkpointing.prepare_workdir(workdir, Config(inner_lr=0.1))
    open(os.path.join(workdir, "history.json"), "w").write("[]")   # it validated once
    with pytest.raises(ConfigError, match="holds a run with different flags"):
        checkpointing.prepare_workdir(workdir, Config(inner_lr=0.2))


def test_evaluate_refuses_a_training_flag_instead_of_ignoring_it(tmp_path):
    (tmp_path / "config.json").write_text(Config().to_json())
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    for flag, message in (("--inner_lr=0.1", "--inner_lr cannot change at evaluation"),
                          ("--seeds=3", "--seeds is a flag of training runs")):
        out = subprocess.run([sys.executable, "-m", "maml_tf.evaluate", f"--workdir={tmp_path}",
                              flag], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode != 0 and message in out.stderr, out.stderr[-2000:]
        assert "Traceback" not in out.stderr


def test_rates_below_one_task_per_second_keep_two_digits():
    assert [metrics.rate_text(r) for r in (0.4123, 3.456, 12.6, 345.2)] == \
        ["0.41", "3.5", "13", "345"]


def test_inner_steps_zero_with_an_adapting_algorithm_warns():
    assert any("--inner_steps=0" in w for w in Config(inner_steps=0).warnings())
    assert not Config(inner_steps=0, algorithm="pretrain").warnings()


def _npz_copy(omniglot_dir, tmp_path):
    data = tmp_path / "omniglot"
    data.mkdir()
    for name in ("images_background.npz", "images_evaluation.npz"):
        shutil.copy(os.path.join(omniglot_dir, name), data / name)
    return data


def test_npz_without_sha256sums_says_the_checksum_was_not_verified(tmp_path, omniglot_dir, caplog):
    data = _npz_copy(omniglot_dir, tmp_path)
    with caplog.at_level(logging.WARNING):
        omniglot.load_raw(str(data), "npz")
    assert "checksums were not verified" in caplog.text


def test_a_malformed_sha256sums_line_names_the_line(tmp_path, omniglot_dir):
    data = _npz_copy(omniglot_dir, tmp_path)
    (data / "SHA256SUMS").write_text("not-a-hash\n")
    with pytest.raises(DataError, match=r"SHA256SUMS line 1 is not '<sha256> <file name>'"):
        omniglot.load_raw(str(data), "npz")


def test_a_file_system_error_is_one_paragraph(tmp_path):
    # A full disk or a read-only folder raise OSError like this does (a workdir inside a
    # regular file); root ignores permissions, so this is the case a test can make here.
    (tmp_path / "a_file").write_text("")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-m", "maml_tf.train", "--dataset=sinusoid",
                          f"--workdir={tmp_path / 'a_file' / 'run'}", *FAST], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "File system error" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("case, env, args, message", [
    ("seed beyond 32 bits", {}, ["--seed=99999999999999999999"], "--seed=99999999999999999999 is too large"),
    ("eval_seed beyond 64 bits", {}, ["--eval_seed=36893488147419103232"],
     "--eval_seed=36893488147419103232 is too large"),
    ("TF_CONFIG not JSON", {"TF_CONFIG": "{not json"}, [], "TF_CONFIG is not valid JSON"),
    ("a meta-batch larger than memory", {}, ["--meta_batch_size=1000000000"],
     "--meta_batch_size=1000000000 needs 41 GiB for one meta-batch's inputs alone"),
    ("task beyond the cluster", {"TF_CONFIG": '{"cluster": {"worker": ["127.0.0.1:1"]}, '
                                              '"task": {"type": "worker", "index": 3}}'},
     [], "is not in its cluster (worker: 1)"),
])
def test_bad_values_of_the_rerun_are_one_paragraph_before_anything_is_written(tmp_path, case, env,
                                                                               args, message):
    out = _train(tmp_path, "--dataset=sinusoid", *args, env=env)
    assert out.returncode != 0 and message in out.stderr, (case, out.stderr[-2000:])
    assert "Traceback" not in out.stderr, case
    assert not os.path.exists(tmp_path / "run" / "config.json"), case


@pytest.mark.parametrize("command", ["maml_tf.train", "maml_tf.evaluate"])
def test_a_stray_argument_is_one_line_not_the_whole_help(tmp_path, command):
    out = _train(tmp_path, "stray", command=command)
    assert out.returncode != 0 and "Unexpected argument 'stray'" in out.stderr, out.stderr[-2000:]
    assert "--inner_lr" not in out.stderr and "Traceback" not in out.stderr


def test_git_is_asked_without_taking_the_checkouts_index_lock(monkeypatch):
    import subprocess as sp
    from maml_tf import provenance
    calls = []
    monkeypatch.setattr(sp, "run", lambda args, **kw: calls.append(args) or sp.CompletedProcess(
        args, 0, stdout="abc\n", stderr=""))
    provenance.git_commit.cache_clear()
    try:
        assert provenance.git_commit() == {"commit": "abc", "dirty": True}
    finally:
        provenance.git_commit.cache_clear()
    assert calls and all("--no-optional-locks" in c for c in calls), calls


@pytest.mark.parametrize("line, message", [
    (b"n0153282900000005.jpg,n01\xff532829\n", "line 3 is not UTF-8 text"),
    (b"n0153282900000005.jpg,\n", "line 3 ('n0153282900000005.jpg,') needs a file name and a label"),
])
def test_a_bad_mini_imagenet_csv_row_is_named(mini_imagenet_dir, tmp_path, line, message):
    import shutil
    from maml_tf.data import mini_imagenet
    shutil.copytree(mini_imagenet_dir, tmp_path / "mini", symlinks=True)
    path = tmp_path / "mini" / "val.csv"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:2] + [line] + lines[2:]))
    with pytest.raises(DataError, match=message.replace("(", "\\(").replace(")", "\\)")):
        mini_imagenet.load_split(str(tmp_path / "mini"), "val")


def test_a_full_disk_and_a_second_interrupt_end_in_one_paragraph(capsys):
    import tensorflow as tf
    from maml_tf import cli
    with pytest.raises(SystemExit) as e:
        with cli.user_errors(verbose=False):
            raise tf.errors.ResourceExhaustedError(None, None, "ckpt-7_temp/part-00000: No space "
                                                   "left on device")
    assert "Out of resources: ckpt-7_temp/part-00000: No space left on device" in str(e.value.code)
    assert "free space and run the same command" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        with cli.user_errors(verbose=False):
            raise KeyboardInterrupt("second SIGINT: stopping at once")
    assert e.value.code == 130
    assert "Stopped at once (second SIGINT: stopping at once)" in capsys.readouterr().err


def test_checkpoint_saves_do_not_print_the_savers_noise(tmp_path):
    out = _train(tmp_path, "--dataset=sinusoid", "--checkpoint_every=1")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Results of checkpoint ckpt-2" in out.stderr
    assert "Sharding callback duration" not in out.stderr


@pytest.mark.parametrize("verbose", [1, 0])
def test_training_from_python_shows_progress_unless_verbose_is_0(tmp_path, verbose):
    code = ("import maml_tf\n"
            "maml_tf.train(maml_tf.Config(num_iterations=2, meta_batch_size=2, eval_tasks=4, "
            "val_tasks=2, log_every=1, eval_every=2, checkpoint_every=2), "
            f"{str(tmp_path / 'run')!r}, verbose={verbose})\n")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    shown = ["Starting at iteration 0 of 2", "Compiled the meta-step", "step 2/2",
             "Results of checkpoint ckpt-2 written"]
    assert all((line in out.stderr) == bool(verbose) for line in shown), out.stderr[-2000:]
