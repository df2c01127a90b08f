"""Config validation, flag parsing and the runs/ flagfiles."""

import glob
import json
import os

import pytest
from absl import flags

from maml_tf import flags as maml_flags
from maml_tf.config import resolved_rotations, Config, ConfigError

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


# -- sections ------------------------------------------------------------------------------
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def _fixture(name: str) -> dict:
    with open(os.path.join(FIXTURES, name)) as f:
        return json.load(f)


@pytest.mark.parametrize("name", sorted(os.listdir(FIXTURES)))
def test_a_flat_config_json_of_earlier_runs_reads_into_the_same_values(name):
    # Written by the code before the sections (commit 6dceb70): every key at the top level.
    flat = _fixture(name)
    config = Config.from_dict(flat)
    now = config.to_flat_dict()
    # Rotations are read as the run used them (only Omniglot's were ever applied).
    assert resolved_rotations({k: now[k] for k in flat}) == resolved_rotations(flat)
    # Fields added since (the generic image path) take their defaults.
    assert {k: v for k, v in now.items() if k not in flat} == {
        k: v for k, v in Config().to_flat_dict().items() if k not in flat}
    assert Config.from_dict(config.to_dict()) == config
    assert Config.from_dict(json.loads(config.to_json())) == config


def test_config_json_holds_only_the_sections_and_switches_that_apply():
    sinusoid = Config.from_dict(_fixture("flat_config_sinusoid.json")).to_dict()
    assert list(sinusoid) == ["data", "network", "learner", "optim", "evaluation", "run"]
    assert "way" not in sinusoid["data"] and "svm_c" not in sinusoid["learner"]
    assert "num_filters" not in sinusoid["network"] and "lslr" not in sinusoid["learner"]
    nav = Config.from_dict(_fixture("flat_config_navigation_2d.json")).to_dict()
    assert nav["rl"]["trajectories"] == 4 and "eval_mode" not in nav["evaluation"]
    assert list(nav["data"]) == ["dataset"]
    mamlpp = Config.from_dict(_fixture("flat_config_omniglot_mamlpp.json")).to_dict()
    assert mamlpp["learner"]["lslr"] is True and mamlpp["network"]["num_filters"] == 48
    assert "svm_c" not in mamlpp["learner"] and mamlpp["data"]["split"] == "vinyals"


def test_a_switch_that_does_not_apply_is_kept_when_it_was_set():
    # Omitting it would change the config on the way through config.json.
    config = Config(dataset="mini_imagenet", split="vinyals")
    assert config.to_dict()["data"]["split"] == "vinyals"
    assert Config.from_dict(config.to_dict()) == config


def test_the_flat_form_and_the_sections_build_the_same_config():
    from maml_tf.config import DataConfig, LearnerConfig
    flat = Config(dataset="omniglot", way=5, shot=1, inner_lr=0.4, algorithm="anil")
    by_sections = Config(data=DataConfig(dataset="omniglot", way=5, shot=1),
                         learner=LearnerConfig(algorithm="anil", inner_lr=0.4))
    assert flat == by_sections
    assert flat.way == flat.data.way == 5 and flat.learner.inner_lr == 0.4
    assert flat.rl is None and flat.trajectories == 20   # an absent section reads defaults
    assert flat.replace(seed=3).run.seed == 3 and flat.run.seed == 0
    with pytest.raises(ConfigError, match="--way=1"):
        DataConfig(dataset="omniglot", way=1)
    with pytest.raises(ConfigError, match="takes a DataConfig, got LearnerConfig"):
        Config(data=LearnerConfig())


def test_a_misspelt_field_is_refused_with_the_right_name():
    with pytest.raises(ConfigError, match="'num_iteration': did you mean 'num_iterations'"):
        Config(num_iteration=5)
    with pytest.raises(ConfigError, match="section 'data' holds 'inner_lr', a field of section 'learner'"):
        Config.from_dict({"data": {"inner_lr": 0.1}})
    with pytest.raises(AttributeError, match="did you mean 'meta_lr'"):
        Config().meta_lrr   # noqa: B018


def test_help_lists_the_flags_by_section():
    import subprocess
    import sys
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-m", "maml_tf.train", "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True).stdout
    titles = ["Data and tasks", "Network", "Algorithm and inner loop", "Optimisation",
              "Evaluation", "Run", "Reinforcement learning"]
    positions = [out.find("\n" + t) for t in titles]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), out[:3000]
    data = out[positions[0]:positions[1]]
    assert "--way" in data and "--inner_lr" not in data
    assert out.find("--inner_lr") > positions[2] and out.find("--trajectories") > positions[6]
    evaluate = subprocess.run([sys.executable, "-m", "maml_tf.evaluate", "--help"], cwd=ROOT,
                              env=env, capture_output=True, text=True).stdout
    assert "--eval_tasks" in evaluate and "--workdir" in evaluate
    assert "  --inner_lr:" not in evaluate and "  --meta_batch_size:" not in evaluate


def test_the_family_flagfiles_are_every_omniglot_5w1s_algorithm_at_2000_iterations(monkeypatch):
    monkeypatch.chdir(ROOT)
    paths = sorted(glob.glob(os.path.join("runs", "family", "*.cfg")))
    configs = [parse([f"--flagfile={p}"])[0] for p in paths]
    assert [os.path.basename(p)[:-4] for p in paths] == sorted(c.algorithm for c in configs)
    assert len(configs) == 17 and all(c.num_iterations == 2000 and c.dataset == "omniglot"
                                      and (c.way, c.test_shots) == (5, (1,)) for c in configs)


@pytest.mark.parametrize("cfg", sorted(glob.glob(os.path.join(ROOT, "runs", "benchmarks", "*.cfg")) +
                                       glob.glob(os.path.join(ROOT, "runs", "own_data", "*.cfg"))))
def test_benchmark_and_own_data_flagfiles_parse_and_name_shipped_splits(cfg, monkeypatch):
    from maml_tf.data import sources
    monkeypatch.chdir(ROOT)
    config, _ = parse([f"--flagfile={os.path.relpath(cfg, ROOT)}"])
    for name in (config.split_file, config.eval_split_file):
        if name:
            lists, counts = sources.read_split_file(name)   # shipped, readable
            assert lists or counts
    if "_common" not in cfg and "benchmarks" in cfg:
        header = open(cfg).read()
        assert "# Published:" in header and "# Command:" in header and "# Measured here:" in header
