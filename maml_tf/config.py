"""The run's typed configuration: built once from flags (or by hand), validated, frozen.

Every error names the flag, the value and what is allowed, so a typo in a flagfile stops
the run before anything is built.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

# Reinforcement-learning task distributions (maml_tf/rl): 2D navigation in TensorFlow, and
# HalfCheetah goal velocity / direction through gymnasium's MuJoCo (pip install -e ".[rl]").
RL_DATASETS = ("navigation_2d", "halfcheetah_vel", "halfcheetah_dir")
DATASETS = ("sinusoid", "omniglot", "mini_imagenet") + RL_DATASETS
ALGORITHMS = ("maml", "fomaml", "reptile", "metasgd", "anil", "boil", "cavia", "imaml", "mamlpp",
              "protonet", "r2d2", "metaoptnet", "matching", "relation", "mann", "snail", "cnp",
              "pretrain")
# Classify queries from support embeddings with no inner loop (algorithms/_embedding.py).
METRIC_LEARNERS = ("protonet", "r2d2", "metaoptnet", "matching", "relation")
# Read the support set and predict the queries directly (algorithms/cnp.py).
BLACK_BOX_LEARNERS = ("mann", "snail", "cnp")
# Each algorithm's own switches: setting one with another algorithm is an error.
ALGORITHM_SWITCHES = {"context_dim": "cavia", "film_layer": "cavia", "imaml_lambda": "imaml", "cg_steps": "imaml",
                      "svm_c": "metaoptnet", "svm_iterations": "metaoptnet",
                      "fce": "matching", "fce_steps": "matching", "relation_hidden": "relation",
                      "mann_write": "mann"}
# The learners that policy-gradient MAML supports (first order, learned rates, and the
# pre-trained baseline, which takes no inner step in meta-training).
RL_ALGORITHMS = ("maml", "fomaml", "metasgd", "pretrain")
# Switches of reinforcement learning only (their defaults are the paper's).
RL_SWITCHES = ("trajectories", "eval_trajectories", "horizon", "discount", "gae_lambda",
               "max_kl", "trpo_cg_iterations", "eval_later_inner_lr", "oracle")
INNER_OPTIMIZERS = ("sgd", "adam")
META_OPTIMIZERS = ("adam", "sgd", "trpo")
LR_SCHEDULES = ("constant", "linear", "cosine")
MODELS = ("auto", "mlp", "conv4", "resnet12")
CUSTOM_INSTANCE = "instance"   # config.model of a run given a keras.Model object
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
SPLITS = ("cbfinn", "vinyals", "lake")
SOURCES = ("auto", "npz", "official", "tfds")
POOLS = ("auto", "stride", "max")
ROTATIONS = ("augment", "none")
ON_NAN = ("fail", "skip")
PRECISIONS = ("float32", "bfloat16", "float16")
NORMS = ("batch", "layer", "none")
# What MANN writes to memory: its own add vector, or the read key (the paper's equation).
MANN_WRITES = ("add", "key")
# How evaluation normalises the queries (meta_learner.EVAL_MODES, README "Evaluation modes").
EVAL_MODES = ("transductive", "support", "per_example")


class ConfigError(ValueError):
    """A flag value that cannot run; the message says which flag and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a run. Field names are the absl flag names."""
    dataset: str = "sinusoid"
    data_dir: str = ""
    data_source: str = "auto"
    split: str = "cbfinn"
    train_rotations: str = "augment"
    eval_rotations: str = "augment"
    model: str = "auto"
    allow_inexact: bool = False
    num_filters: int = 0
    conv_pool: str = "auto"
    norm: str = "batch"
    algorithm: str = "maml"
    way: int = 5
    shot: int = 1
    query: int = 0
    eval_shots: tuple[int, ...] = ()
    eval_queries: int = 0
    eval_mode: str = "transductive"
    inner_steps: int = 1
    inner_optimizer: str = "sgd"
    inner_recompute: bool = False
    precision: str = "float32"
    eval_inner_steps: int = 0
    inner_lr: float = 0.01
    meta_lr: float = 1e-3
    meta_optimizer: str = "adam"
    meta_lr_schedule: str = "constant"
    min_meta_lr: float = 0.0
    lslr: bool = False
    bnwb: bool = False
    bnrs: bool = False
    msl_iterations: int = 0
    da_iterations: int = 0
    context_dim: int = 100
    film_layer: str = ""
    imaml_lambda: float = 1.0
    cg_steps: int = 5
    svm_c: float = 0.1
    svm_iterations: int = 25
    fce: bool = False
    fce_steps: int = 5
    relation_hidden: int = 8
    mann_write: str = "add"
    # -- reinforcement learning (RL_DATASETS) --
    trajectories: int = 20
    eval_trajectories: int = 40
    horizon: int = 0
    discount: float = 0.99
    gae_lambda: float = 1.0
    max_kl: float = 0.01
    trpo_cg_iterations: int = 10
    eval_later_inner_lr: float = 0.0
    oracle: bool = False
    meta_batch_size: int = 25
    task_chunks: int = 0
    grad_clip: float = 0.0
    num_iterations: int = 70000
    eval_tasks: int = 600
    val_tasks: int = 100
    eval_seed: int = 1234
    seed: int = 0
    strategy: str = "default"
    tpu: str = ""
    cpu_devices: int = 0
    jit_compile: bool = True
    log_every: int = 100
    step_metrics_every: int = 10
    eval_every: int = 1000
    checkpoint_every: int = 1000
    on_nan: str = "fail"

    def __post_init__(self):
        # Built by hand (maml_tf.Config(...)) or from flags: checked the same way.
        if self.eval_shots is not None and not isinstance(self.eval_shots, tuple):
            object.__setattr__(self, "eval_shots", _ints("eval_shots", self.eval_shots))
        self.validate()

    # -- derived values -----------------------------------------------------------------
    @property
    def is_custom_model(self) -> bool:
        """A user's model: ``module:function``, ``file.py:function``, or ``instance`` (a
        ``keras.Model`` object passed to ``train_loop.run``)."""
        return ":" in self.model or self.model == CUSTOM_INSTANCE

    @property
    def is_regression(self) -> bool:
        return self.dataset == "sinusoid"

    @property
    def is_rl(self) -> bool:
        """A reinforcement-learning task distribution (maml_tf/rl)."""
        return self.dataset in RL_DATASETS

    @property
    def test_inner_lrs(self) -> tuple[float, ...]:
        """RL evaluation: the step size of each test inner step (the paper: 0.1, then 0.05)."""
        later = self.eval_later_inner_lr or self.inner_lr
        return tuple(self.inner_lr if k == 0 else later for k in range(self.test_inner_steps))

    @property
    def first_order(self) -> bool:
        """No second-order term: FOMAML, and Reptile (which has no outer tape at all)."""
        return self.algorithm in ("fomaml", "reptile")

    @property
    def is_metric_learner(self) -> bool:
        """ProtoNets, R2-D2, MetaOptNet, Matching and Relation Networks: the classifier is
        built from the support set, with no inner loop."""
        return self.algorithm in METRIC_LEARNERS

    @property
    def has_inner_loop(self) -> bool:
        """False for the embedding and black-box learners (pre-training has one at test)."""
        return not self.is_metric_learner and self.algorithm not in BLACK_BOX_LEARNERS

    @property
    def shuffled_support(self) -> bool:
        """Whether each task's support set comes in a random order instead of class by class:
        MANN reads it as a sequence in which the classes must interleave."""
        return self.algorithm == "mann"

    @property
    def queries(self) -> int:
        """Query examples per class (classification) or points per task (sinusoid)."""
        if self.query:
            return self.query
        return 10 if self.is_regression else self.shot

    @property
    def test_queries(self) -> int:
        """Queries per class (points per sinusoid task) of the validation and test tasks."""
        return self.eval_queries or self.queries

    @property
    def test_inner_steps(self) -> int:
        if not self.has_inner_loop:
            return 0
        return self.eval_inner_steps or self.inner_steps

    @property
    def test_shots(self) -> tuple[int, ...]:
        return self.eval_shots or (self.shot,)

    @property
    def model_name(self) -> str:
        if self.is_custom_model:
            return "custom"
        if self.model != "auto":
            return self.model
        return "mlp" if self.is_regression or self.is_rl else "conv4"

    @property
    def filters(self) -> int:
        return self.num_filters or (32 if self.dataset == "mini_imagenet" else 64)

    @property
    def pool(self) -> str:
        if self.conv_pool != "auto":
            return self.conv_pool
        return "max" if self.dataset == "mini_imagenet" else "stride"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (84, 84, 3) if self.dataset == "mini_imagenet" else (28, 28, 1)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"Unknown config keys {unknown}; known keys: {sorted(names)}.")
        values = dict(values)
        if "eval_shots" in values and values["eval_shots"] is not None:
            values["eval_shots"] = _ints("eval_shots", values["eval_shots"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eval_shots"] = list(self.eval_shots)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_flagfile(self) -> str:
        """Flag lines that rebuild exactly this config."""
        lines = []
        for key, value in sorted(self.to_dict().items()):
            if isinstance(value, list):
                value = ",".join(str(v) for v in value)
            elif isinstance(value, bool):
                value = str(value).lower()
            lines.append(f"--{key}={value}")
        return "\n".join(lines) + "\n"

    # -- validation ---------------------------------------------------------------------
    def validate(self) -> None:
        _choice("dataset", self.dataset, DATASETS)
        _choice("algorithm", self.algorithm, ALGORITHMS)
        if not self.is_custom_model:
            _choice("model", self.model, MODELS + ("package.module:function",))
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("split", self.split, SPLITS)
        _choice("data_source", self.data_source, SOURCES)
        _choice("conv_pool", self.conv_pool, POOLS)
        _choice("train_rotations", self.train_rotations, ROTATIONS)
        _choice("eval_rotations", self.eval_rotations, ROTATIONS)
        _choice("on_nan", self.on_nan, ON_NAN)
        _choice("precision", self.precision, PRECISIONS)
        _choice("norm", self.norm, NORMS)
        _choice("eval_mode", self.eval_mode, EVAL_MODES)
        _at_least("eval_queries", self.eval_queries, 0, "(0: the same as --query)")
        _choice("inner_optimizer", self.inner_optimizer, INNER_OPTIMIZERS)
        _choice("meta_optimizer", self.meta_optimizer, META_OPTIMIZERS)
        _choice("meta_lr_schedule", self.meta_lr_schedule, LR_SCHEDULES)
        if not self.is_regression:
            _at_least("way", self.way, 2)
        _at_least("shot", self.shot, 1)
        _at_least("query", self.query, 0, "(0 picks the default: shot per class, 10 for sinusoid)")
        for s in self.eval_shots:
            _at_least("eval_shots", s, 1)
        _at_least("inner_steps", self.inner_steps, 0)
        _at_least("eval_inner_steps", self.eval_inner_steps, 0, "(0 means inner_steps)")
        _positive("inner_lr", self.inner_lr, allow_zero=True)
        _positive("meta_lr", self.meta_lr)
        _positive("min_meta_lr", self.min_meta_lr, allow_zero=True)
        _at_least("msl_iterations", self.msl_iterations, 0, "(0: no multi-step loss)")
        _at_least("da_iterations", self.da_iterations, 0, "(0: second order from the start)")
        _at_least("context_dim", self.context_dim, 1)
        _positive("imaml_lambda", self.imaml_lambda)
        _at_least("cg_steps", self.cg_steps, 1)
        _positive("svm_c", self.svm_c)
        _at_least("svm_iterations", self.svm_iterations, 1)
        _at_least("fce_steps", self.fce_steps, 1)
        _at_least("relation_hidden", self.relation_hidden, 1)
        _choice("mann_write", self.mann_write, MANN_WRITES)
        _at_least("trajectories", self.trajectories, 2, "(the baseline and the normalised "
                  "advantages need two)")
        _at_least("eval_trajectories", self.eval_trajectories, 2)
        _at_least("horizon", self.horizon, 0, "(0: the environment's own)")
        for name in ("discount", "gae_lambda"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise ConfigError(f"--{name}={value!r} is invalid: it must lie in [0, 1].")
        _positive("max_kl", self.max_kl)
        _at_least("trpo_cg_iterations", self.trpo_cg_iterations, 1)
        _positive("eval_later_inner_lr", self.eval_later_inner_lr, allow_zero=True)
        _positive("grad_clip", self.grad_clip, allow_zero=True)
        _at_least("meta_batch_size", self.meta_batch_size, 1)
        _at_least("task_chunks", self.task_chunks, 0,
                  "(0: chosen from the shapes and the machine; 1: all tasks of a replica at once)")
        _at_least("num_iterations", self.num_iterations, 0)
        _at_least("eval_tasks", self.eval_tasks, 1)
        _at_least("val_tasks", self.val_tasks, 1)
        for name in ("log_every", "eval_every", "checkpoint_every"):
            _at_least(name, getattr(self, name), 1)
        _at_least("step_metrics_every", self.step_metrics_every, 1,
                  "(1: the query metrics after every inner step on every meta-step)")
        _at_least("cpu_devices", self.cpu_devices, 0, "(0 keeps one CPU device)")
        _at_least("seed", self.seed, 0)
        _at_least("eval_seed", self.eval_seed, 0)
        _at_least("num_filters", self.num_filters, 0, "(0 picks 64 for Omniglot, 32 for mini-ImageNet)")
        self._validate_combinations()

    def warnings(self) -> list[str]:
        """Settings that run but are probably not what was meant."""
        out = []
        adapts = self.has_inner_loop and self.algorithm != "pretrain"
        if adapts and self.inner_steps == 0:
            out.append(f"--inner_steps=0 with --algorithm={self.algorithm}: the inner loop never "
                       "adapts in meta-training, so this trains one network for all tasks.")
        return out

    def _validate_rl(self) -> None:
        defaults = Config.__dataclass_fields__
        if not self.is_rl:
            for name in RL_SWITCHES:
                if getattr(self, name) != defaults[name].default:
                    raise ConfigError(f"--{name} is a reinforcement-learning switch; it needs "
                                      f"--dataset={'/'.join(RL_DATASETS)} (got "
                                      f"--dataset={self.dataset}).")
            if self.meta_optimizer == "trpo":
                raise ConfigError("--meta_optimizer=trpo is the outer loop of reinforcement "
                                  f"learning (--dataset={'/'.join(RL_DATASETS)}); use adam or "
                                  "sgd here.")
            return
        if self.algorithm not in RL_ALGORITHMS:
            raise ConfigError(f"--algorithm={self.algorithm} is not implemented for "
                              f"reinforcement learning; choose one of {', '.join(RL_ALGORITHMS)}.")
        if self.meta_optimizer == "sgd":
            raise ConfigError("--meta_optimizer=sgd is not offered for reinforcement learning: "
                              "use trpo (the paper) or adam.")
        if self.inner_steps > 1:
            raise ConfigError(f"--inner_steps={self.inner_steps}: meta-training takes at most "
                              "one policy-gradient inner step here (each further step would "
                              "need its own trajectories of the adapted policy); evaluation "
                              "takes --eval_inner_steps of them.")
        if self.strategy != "default" or self.cpu_devices:
            raise ConfigError(f"--strategy={self.strategy}: reinforcement learning runs on one "
                              "device for now (rollouts are sampled in the training process); "
                              "use --strategy=default.")
        if self.precision != "float32" or self.task_chunks > 1 or self.inner_recompute:
            raise ConfigError("--precision, --task_chunks and --inner_recompute are not offered "
                              "for reinforcement learning: drop them.")
        if self.model_name in ("conv4", "resnet12") or self.num_filters or \
                self.conv_pool != "auto" or self.norm != "batch":
            raise ConfigError(f"--model={self.model} and the Conv-4 switches are image models; "
                              "a policy is --model=auto (the paper's Gaussian MLP) or your own "
                              "function.")
        if self.grad_clip and self.meta_optimizer == "trpo":
            raise ConfigError("--grad_clip does not apply to TRPO, whose step is bounded by "
                              "--max_kl: drop it.")

    def _validate_combinations(self) -> None:
        self._validate_rl()
        if self.is_rl:
            self._validate_algorithm()
            return
        if self.is_regression and self.model_name == "conv4":
            raise ConfigError("--model=conv4 is an image model but --dataset=sinusoid is 1-D "
                              "regression: use --model=mlp (or auto) with sinusoid.")
        if self.is_regression and self.conv_pool != "auto":
            raise ConfigError(f"--conv_pool={self.conv_pool} only applies to --model=conv4 on "
                              "image data sets; drop it for --dataset=sinusoid.")
        if self.is_regression and self.model_name == "resnet12":
            raise ConfigError("--model=resnet12 is an image model but --dataset=sinusoid is 1-D "
                              "regression: use --model=mlp (or auto) with sinusoid.")
        if self.model_name in ("custom", "resnet12", "mlp") and (
                self.num_filters or self.conv_pool != "auto" or self.norm != "batch"):
            raise ConfigError("--num_filters, --conv_pool and --norm configure the zoo's Conv-4; "
                              f"drop them with --model={self.model} (its function decides).")
        if self.dataset == "mini_imagenet" and self.model_name == "mlp":
            raise ConfigError("--model=mlp is defined for sinusoid and Omniglot (the paper's "
                              "non-conv baseline); use --model=conv4 for mini_imagenet.")
        if self.dataset == "omniglot" and self.split == "lake" and self.way > 659:
            raise ConfigError(f"--way={self.way} exceeds the 659 test characters of the lake split.")
        self._validate_algorithm()
        if self.strategy == "tpu" and self.jit_compile is False:
            raise ConfigError("--strategy=tpu always compiles with XLA; drop --nojit_compile.")


    def _validate_algorithm(self) -> None:
        mamlpp = {"lslr": self.lslr, "bnwb": self.bnwb, "bnrs": self.bnrs,
                  "msl_iterations": self.msl_iterations,
                  "da_iterations": self.da_iterations}
        used = [name for name, value in mamlpp.items() if value]
        if used and self.algorithm != "mamlpp":
            raise ConfigError(f"--{used[0]} is a MAML++ switch; it needs --algorithm=mamlpp "
                              f"(got --algorithm={self.algorithm}).")
        custom = self.model_name != "conv4" and not self.is_regression
        if self.bnwb and not custom and (self.is_regression or self.norm == "none"):
            raise ConfigError("--bnwb learns per-step batch-norm weights, but this network has no "
                              "normalisation layers (sinusoid MLP or --norm=none); drop --bnwb.")
        if self.bnrs and not custom and (self.is_regression or self.norm != "batch"):
            raise ConfigError("--bnrs keeps per-step batch-norm statistics, but this network has "
                              "no batch norm (sinusoid MLP or --norm other than batch); drop --bnrs.")
        if self.bnrs and self.inner_recompute:
            raise ConfigError("--bnrs records batch statistics in the forward pass, which "
                              "--inner_recompute re-runs in the backward pass; use one of them.")
        if self.inner_optimizer == "adam" and self.algorithm != "reptile":
            raise ConfigError("--inner_optimizer=adam is Reptile's first-order inner loop; "
                              "use --algorithm=reptile, or --inner_optimizer=sgd.")
        if self.is_metric_learner and self.is_regression:
            raise ConfigError(f"--algorithm={self.algorithm} classifies queries from support "
                              "embeddings; it does not apply to --dataset=sinusoid.")
        if self.algorithm in ("mann", "snail") and self.is_regression:
            raise ConfigError(f"--algorithm={self.algorithm} is a few-shot classifier; it does "
                              "not apply to --dataset=sinusoid.")
        if self.algorithm == "snail" and any(s != self.shot for s in self.test_shots):
            raise ConfigError(f"--algorithm=snail reads sequences of way x shot examples and is "
                              f"built for --shot={self.shot}: drop --eval_shots or set it to "
                              f"{self.shot}.")
        if self.algorithm == "cnp" and self.is_regression and self.is_custom_model:
            raise ConfigError("--algorithm=cnp on --dataset=sinusoid builds its own encoder and "
                              "decoder; drop --model (on images, --model is the body that "
                              "embeds each image).")
        defaults = Config.__dataclass_fields__
        for name, owner in ALGORITHM_SWITCHES.items():
            if getattr(self, name) != defaults[name].default and self.algorithm != owner:
                raise ConfigError(f"--{name} is a switch of --algorithm={owner} (got "
                                  f"--algorithm={self.algorithm}): drop it or change algorithm.")
        if self.eval_mode == "support" and self.algorithm == "cnp" and self.is_regression:
            raise ConfigError("--eval_mode=support normalises each task's queries with the "
                              "network's statistics on its support set; the CNP has no batch "
                              "norm and decodes each query alone already: use "
                              "--eval_mode=per_example (or transductive).")
        if self.eval_mode == "support" and self.bnrs:
            raise ConfigError("--bnrs normalises queries with MAML++'s running statistics, so "
                              "--eval_mode=support would not apply: use --eval_mode=per_example.")
        if self.is_rl and (self.eval_mode != "transductive" or self.eval_queries):
            raise ConfigError("--eval_mode and --eval_queries are few-shot evaluation settings; "
                              "a policy has no queries: drop them.")
        if self.cpu_devices and self.strategy == "default":
            raise ConfigError(f"--cpu_devices={self.cpu_devices} splits the CPU into replicas for "
                              "--strategy=mirrored; with the default strategy it does nothing: "
                              "add --strategy=mirrored or drop --cpu_devices.")
        if self.min_meta_lr > self.meta_lr:
            raise ConfigError(f"--min_meta_lr={self.min_meta_lr} exceeds --meta_lr={self.meta_lr}.")


def _ints(name: str, values) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise ConfigError(f"--{name}={','.join(str(v) for v in values)} is invalid: it must be a "
                          "comma-separated list of integers, e.g. --eval_shots=1,5.") from None


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"--{name}={value!r} is not allowed; choose one of {', '.join(allowed)}.")


def _at_least(name: str, value: int, low: int, note: str = "") -> None:
    if not isinstance(value, int) or value < low:
        raise ConfigError(f"--{name}={value!r} is invalid: it must be an integer >= {low} {note}".rstrip() + ".")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (
        value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"--{name}={value!r} is invalid: it must be a finite number {bound}.")
