"""Config validation, flag parsing and the runs/ flagfiles."""

import glob
import os

import pytest
from absl import flags

from maml_tf import flags as maml_flags
from maml_tf.config import Config, ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(argv):
    """Parses argv with the project's flags and returns (Config, FLAGS); then resets them."""
    values = flags.FLAGS
    values(["prog"] + maml_flags.expand_flagfiles(argv))
    try:
        return maml_flags.config_from_flags(values), values
    finally:
        values.unparse_flags()


@pytest.mark.parametrize("bad, message", [
    ({"way": 1, "dataset": "omniglot"}, "--way=1"),
    ({"shot": 0}, "--shot=0"),
    ({"inner_lr": -0.1}, "--inner_lr=-0.1"),
    ({"meta_lr": float("nan")}, "--meta_lr=nan"),
    ({"dataset": "imagenet"}, "--dataset='imagenet' is not allowed; choose one of sinusoid"),
    ({"algorithm": "mamll"}, "--algorithm='mamll'"),
    ({"model": "conv4"}, "--model=conv4 is an image model"),
    ({"conv_pool": "max"}, "--conv_pool=max only applies"),
    ({"dataset": "omniglot", "mann_write": "key"}, "--mann_write is a switch of --algorithm=mann"),
    ({"dataset": "omniglot", "algorithm": "mann", "mann_write": "value"},
     "--mann_write='value' is not allowed; choose one of add, key"),
])
def test_invalid_values_name_flag_value_and_allowed(bad, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        Config.from_dict(bad)


def test_flagfile_round_trip_rebuilds_the_same_config(tmp_path):
    config = Config.from_dict({"dataset": "omniglot", "way": 20, "eval_shots": [1, 5],
                               "jit_compile": False, "inner_lr": 0.1})
    path = tmp_path / "flags.cfg"
    path.write_text(config.to_flagfile())
    parsed, _ = parse([f"--flagfile={path}"])
    assert parsed == config


@pytest.mark.parametrize("cfg", sorted(glob.glob(os.path.join(ROOT, "runs", "*.cfg"))))
def test_runs_flagfiles_parse(cfg, monkeypatch):
    monkeypatch.chdir(ROOT)
    config, _ = parse([f"--flagfile={os.path.relpath(cfg, ROOT)}"])
    # Paper-scale schedules (MAML++'s is 100 epochs x 500 iterations; reinforcement learning's
    # 500 TRPO meta-iterations; the random-initialisation baseline trains for none; MANN's
    # 100,000 episodes).
    if config.is_rl:
        assert config.num_iterations >= 500 or cfg.endswith("_random.cfg")
    elif config.algorithm == "mann":
        assert config.num_iterations * config.meta_batch_size >= 100_000
    else:
        assert config.num_iterations >= 50000 or "sinusoid" in cfg


def test_flags_after_a_flagfile_override_it(monkeypatch):
    monkeypatch.chdir(ROOT)
    config, _ = parse(["--flagfile=runs/omniglot_5w1s.cfg", "--inner_lr=0.2"])
    assert config.inner_lr == 0.2 and config.way == 5 and config.dataset == "omniglot"


def test_flagfiles_include_others_relative_to_themselves_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config, _ = parse([f"--flagfile={os.path.join(ROOT, 'runs', 'omniglot_5w1s_anil.cfg')}"])
    assert config.algorithm == "anil" and config.dataset == "omniglot" and config.inner_lr == 0.4


def test_help_lists_the_projects_flags():
    import subprocess
    import sys
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-m", "maml_tf.train", "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert "--inner_lr" in out.stdout and "--meta_batch_size" in out.stdout, out.stdout[-1000:]


def test_missing_flagfile_is_a_clear_error():
    with pytest.raises(ConfigError, match="--flagfile=runs/no_such.cfg: no such file"):
        parse(["--flagfile=runs/no_such.cfg"])
