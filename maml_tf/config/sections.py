"""The sections of a run's ``Config``: one frozen dataclass per concern, each checking its
own values (a value out of range or not among the choices). What depends on two sections
at once (``--model=conv4`` with ``--dataset=sinusoid``, a MAML++ switch with another
algorithm) is checked in one place, ``Config`` (``maml_tf/config/__init__.py``).

Field names are the absl flag names, and are unique over all sections, so that a flat
``Config(way=5, inner_lr=0.4)`` and a flat config.json of older runs name each field once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

# Reinforcement-learning task distributions (maml_tf/rl): 2D navigation in TensorFlow, and
# HalfCheetah goal velocity / direction through gymnasium's MuJoCo (pip install -e ".[rl]").
RL_DATASETS = ("navigation_2d", "halfcheetah_vel", "halfcheetah_dir")
# Image data sets of any class structure, read by one generic path (data/sources.py): a folder
# tree of images, a data set passed from Python (``maml_tf.train(..., data=...)``), and any TFDS
# image-classification data set as ``tfds:<name>``.
IMAGE_SOURCES = ("folder", "python")
TFDS_PREFIX = "tfds:"
DATASETS = ("sinusoid", "omniglot", "mini_imagenet") + IMAGE_SOURCES + RL_DATASETS
ALGORITHMS = ("maml", "fomaml", "reptile", "metasgd", "anil", "boil", "cavia", "imaml", "mamlpp",
              "protonet", "r2d2", "metaoptnet", "matching", "relation", "mann", "snail", "cnp",
              "pretrain")
# Classify queries from support embeddings with no inner loop (algorithms/_embedding.py).
METRIC_LEARNERS = ("protonet", "r2d2", "metaoptnet", "matching", "relation")
# Read the support set and predict the queries directly (algorithms/cnp.py).
BLACK_BOX_LEARNERS = ("mann", "snail", "cnp")
# Each algorithm's own switches: setting one with another algorithm is an error, and a
# run's config.json holds only its own algorithm's.
ALGORITHM_SWITCHES = {"context_dim": "cavia", "film_layer": "cavia", "imaml_lambda": "imaml",
                      "cg_steps": "imaml", "cg_damping": "imaml",
                      "imaml_lambda_damping": "imaml", "svm_c": "metaoptnet", "svm_iterations": "metaoptnet",
                      "fce": "matching", "fce_steps": "matching", "relation_hidden": "relation",
                      "mann_write": "mann", "lslr": "mamlpp", "bnwb": "mamlpp", "bnrs": "mamlpp",
                      "msl_iterations": "mamlpp", "da_iterations": "mamlpp"}
MAMLPP_SWITCHES = ("lslr", "bnwb", "bnrs", "msl_iterations", "da_iterations")
# The learners that policy-gradient MAML supports (first order, learned rates, and the
# pre-trained baseline, which takes no inner step in meta-training).
RL_ALGORITHMS = ("maml", "fomaml", "metasgd", "pretrain")
INNER_OPTIMIZERS = ("sgd", "adam")
META_OPTIMIZERS = ("adam", "sgd", "trpo")
LR_SCHEDULES = ("constant", "linear", "cosine")
MODELS = ("auto", "mlp", "conv4", "resnet12")
CUSTOM_INSTANCE = "instance"   # config.model of a run given a keras.Model object
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
SPLITS = ("cbfinn", "vinyals", "lake")
SOURCES = ("auto", "npz", "official", "tfds")
POOLS = ("auto", "stride", "max")
# 'auto': augment Omniglot, none for every other data set.
ROTATIONS = ("auto", "augment", "none")
ON_NAN = ("fail", "skip")
PRECISIONS = ("float32", "bfloat16", "float16", "mixed_bfloat16")
NORMS = ("batch", "layer", "none")
# What MANN writes to memory: its own add vector, or the read key (the paper's equation).
MANN_WRITES = ("add", "key")
# How evaluation normalises the queries (meta_learner.EVAL_MODES, README "Evaluation modes").
EVAL_MODES = ("transductive", "support", "per_example")


class ConfigError(ValueError):
    """A flag value that cannot run; the message says which flag and how to fix it."""


class Section:
    """A frozen dataclass of flags that belong together; ``check`` validates its own."""
    NAME: ClassVar[str]
    TITLE: ClassVar[str]   # the heading of the section in --help

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        raise NotImplementedError

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))   # type: ignore[arg-type]

    @classmethod
    def default(cls, name: str) -> Any:
        return cls.__dataclass_fields__[name].default   # type: ignore[attr-defined]


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
    """What the tasks are made of: the data set, its split and the task shape."""
    NAME: ClassVar[str] = "data"
    TITLE: ClassVar[str] = "Data and tasks"
    dataset: str = "sinusoid"
    data_dir: str = ""
    data_source: str = "auto"
    split: str = "cbfinn"
    train_rotations: str = "auto"
    eval_rotations: str = "auto"
    way: int = 5
    shot: int = 1
    query: int = 0
    image_size: int = 0
    channels: int = 0
    class_split: tuple[int, ...] = ()
    split_file: str = ""
    label_key: str = "label"
    invert_images: bool = False
    crop_to_boxes: bool = False
    strict_data: bool = False
    cache_dir: str = ""

    def check(self) -> None:
        if not (self.dataset.startswith(TFDS_PREFIX) and len(self.dataset) > len(TFDS_PREFIX)):
            choice("dataset", self.dataset, DATASETS + ("tfds:<name>",))
        at_least("image_size", self.image_size, 0, "(0: the data set's own: 28 for Omniglot, 84 "
                 "otherwise)")
        choice("channels", self.channels, (0, 1, 3))
        if self.class_split and (len(self.class_split) != 3 or min(self.class_split) < 0 or
                                 not all(self.class_split)):
            raise ConfigError(f"--class_split={','.join(map(str, self.class_split))} is invalid: "
                              "give three positive class counts train,val,test, e.g. "
                              "--class_split=64,16,20.")
        choice("split", self.split, SPLITS)
        choice("data_source", self.data_source, SOURCES)
        choice("train_rotations", self.train_rotations, ROTATIONS)
        choice("eval_rotations", self.eval_rotations, ROTATIONS)
        if self.dataset != "sinusoid":
            at_least("way", self.way, 2)
        at_least("shot", self.shot, 1)
        at_least("query", self.query, 0, "(0 picks the default: shot per class, 10 for sinusoid)")


@dataclasses.dataclass(frozen=True)
class NetworkConfig(Section):
    """The network that is meta-learned and how it computes."""
    NAME: ClassVar[str] = "network"
    TITLE: ClassVar[str] = "Network"
    model: str = "auto"
    allow_inexact: bool = False
    num_filters: int = 0
    conv_pool: str = "auto"
    norm: str = "batch"
    precision: str = "float32"

    def check(self) -> None:
        if not (":" in self.model or self.model == CUSTOM_INSTANCE):
            choice("model", self.model, MODELS + ("package.module:function",))
        choice("conv_pool", self.conv_pool, POOLS)
        choice("precision", self.precision, PRECISIONS)
        choice("norm", self.norm, NORMS)
        at_least("num_filters", self.num_filters, 0,
                 "(0 picks 64 for Omniglot, 32 for mini-ImageNet)")


@dataclasses.dataclass(frozen=True)
class LearnerConfig(Section):
    """The meta-learning algorithm, its inner loop and its own switches."""
    NAME: ClassVar[str] = "learner"
    TITLE: ClassVar[str] = "Algorithm and inner loop"
    algorithm: str = "maml"
    inner_steps: int = 1
    inner_optimizer: str = "sgd"
    inner_recompute: bool = False
    inner_lr: float = 0.01
    lslr: bool = False
    bnwb: bool = False
    bnrs: bool = False
    msl_iterations: int = 0
    da_iterations: int = 0
    context_dim: int = 100
    film_layer: str = ""
    imaml_lambda: float = 1.0
    cg_steps: int = 5
    cg_damping: float = 0.0
    imaml_lambda_damping: float = 0.0
    svm_c: float = 0.1
    svm_iterations: int = 25
    fce: bool = False
    fce_steps: int = 5
    relation_hidden: int = 8
    mann_write: str = "add"

    def check(self) -> None:
        choice("algorithm", self.algorithm, ALGORITHMS)
        choice("inner_optimizer", self.inner_optimizer, INNER_OPTIMIZERS)
        at_least("inner_steps", self.inner_steps, 0)
        positive("inner_lr", self.inner_lr, allow_zero=True)
        at_least("msl_iterations", self.msl_iterations, 0, "(0: no multi-step loss)")
        at_least("da_iterations", self.da_iterations, 0, "(0: second order from the start)")
        at_least("context_dim", self.context_dim, 1)
        positive("imaml_lambda", self.imaml_lambda)
        at_least("cg_steps", self.cg_steps, 1)
        positive("cg_damping", self.cg_damping, allow_zero=True)
        positive("imaml_lambda_damping", self.imaml_lambda_damping, allow_zero=True)
        positive("svm_c", self.svm_c)
        at_least("svm_iterations", self.svm_iterations, 1)
        at_least("fce_steps", self.fce_steps, 1)
        at_least("relation_hidden", self.relation_hidden, 1)
        choice("mann_write", self.mann_write, MANN_WRITES)
        for name, owner in ALGORITHM_SWITCHES.items():
            if getattr(self, name) != self.default(name) and self.algorithm != owner:
                what = "a MAML++ switch; it needs" if owner == "mamlpp" else "a switch of"
                raise ConfigError(f"--{name} is {what} --algorithm={owner} (got "
                                  f"--algorithm={self.algorithm}): drop it or change algorithm.")
        if self.inner_optimizer == "adam" and self.algorithm != "reptile":
            raise ConfigError("--inner_optimizer=adam is Reptile's first-order inner loop; "
                              "use --algorithm=reptile, or --inner_optimizer=sgd.")
        if self.bnrs and self.inner_recompute:
            raise ConfigError("--bnrs records batch statistics in the forward pass, which "
                              "--inner_recompute re-runs in the backward pass; use one of them.")


@dataclasses.dataclass(frozen=True)
class OptimConfig(Section):
    """The outer loop: optimizer, schedule, meta-batch and how long."""
    NAME: ClassVar[str] = "optim"
    TITLE: ClassVar[str] = "Optimisation (the outer loop)"
    meta_lr: float = 1e-3
    meta_optimizer: str = "adam"
    meta_lr_schedule: str = "constant"
    min_meta_lr: float = 0.0
    meta_batch_size: int = 25
    task_chunks: int = 0
    grad_clip: float = 0.0
    num_iterations: int = 70000
    on_nan: str = "fail"

    def check(self) -> None:
        choice("meta_optimizer", self.meta_optimizer, META_OPTIMIZERS)
        choice("meta_lr_schedule", self.meta_lr_schedule, LR_SCHEDULES)
        choice("on_nan", self.on_nan, ON_NAN)
        positive("meta_lr", self.meta_lr)
        positive("min_meta_lr", self.min_meta_lr, allow_zero=True)
        positive("grad_clip", self.grad_clip, allow_zero=True)
        at_least("meta_batch_size", self.meta_batch_size, 1)
        at_least("task_chunks", self.task_chunks, 0,
                 "(0: chosen from the shapes and the machine; 1: all tasks of a replica at once)")
        at_least("num_iterations", self.num_iterations, 0)
        if self.min_meta_lr > self.meta_lr:
            raise ConfigError(f"--min_meta_lr={self.min_meta_lr} exceeds --meta_lr={self.meta_lr}.")


@dataclasses.dataclass(frozen=True)
class EvalConfig(Section):
    """Validation during training and the final evaluation on fixed tasks."""
    NAME: ClassVar[str] = "evaluation"
    TITLE: ClassVar[str] = "Evaluation"
    eval_shots: tuple[int, ...] = ()
    eval_queries: int = 0
    eval_mode: str = "transductive"
    eval_inner_steps: int = 0
    eval_tasks: int = 600
    val_tasks: int = 100
    eval_seed: int = 1234
    eval_every: int = 1000
    stop_when_flat: int = 0
    eval_dataset: str = ""
    eval_data_dir: str = ""
    eval_split_file: str = ""

    def __post_init__(self):
        if not isinstance(self.eval_shots, tuple):
            object.__setattr__(self, "eval_shots", ints("eval_shots", self.eval_shots))
        super().__post_init__()

    def check(self) -> None:
        choice("eval_mode", self.eval_mode, EVAL_MODES)
        at_least("eval_queries", self.eval_queries, 0, "(0: the same as --query)")
        for s in self.eval_shots:
            at_least("eval_shots", s, 1)
        at_least("eval_inner_steps", self.eval_inner_steps, 0, "(0 means inner_steps)")
        at_least("eval_tasks", self.eval_tasks, 1)
        at_least("val_tasks", self.val_tasks, 1)
        at_most("eval_seed", self.eval_seed, 2 ** 63 - 1, "(a 64-bit seed)")
        at_least("eval_every", self.eval_every, 1)
        at_least("stop_when_flat", self.stop_when_flat, 0, "(0: train all --num_iterations)")
        if self.eval_dataset and not self.eval_dataset.startswith(TFDS_PREFIX):
            choice("eval_dataset", self.eval_dataset, ("omniglot", "mini_imagenet", "folder",
                                                       "tfds:<name>"))
        if (self.eval_data_dir or self.eval_split_file) and not self.eval_dataset:
            raise ConfigError("--eval_data_dir and --eval_split_file describe the data set of "
                              "--eval_dataset (cross-domain evaluation): set --eval_dataset too.")


@dataclasses.dataclass(frozen=True)
class RunConfig(Section):
    """Where and how the run executes: seed, devices, compilation, logs and checkpoints."""
    NAME: ClassVar[str] = "run"
    TITLE: ClassVar[str] = "Run: seed, devices, logging and checkpoints"
    seed: int = 0
    strategy: str = "default"
    tpu: str = ""
    cpu_devices: int = 0
    jit_compile: bool = True
    log_every: int = 100
    step_metrics_every: int = 10
    checkpoint_every: int = 1000

    def check(self) -> None:
        choice("strategy", self.strategy, STRATEGIES)
        at_most("seed", self.seed, 2 ** 32 - 1, "(Keras seeds its generators with 32 bits)")
        at_least("cpu_devices", self.cpu_devices, 0, "(0 keeps one CPU device)")
        for name in ("log_every", "checkpoint_every"):
            at_least(name, getattr(self, name), 1)
        at_least("step_metrics_every", self.step_metrics_every, 1,
                 "(1: the query metrics after every inner step on every meta-step)")
        if self.cpu_devices and self.strategy == "default":
            raise ConfigError(f"--cpu_devices={self.cpu_devices} splits the CPU into replicas for "
                              "--strategy=mirrored; with the default strategy it does nothing: "
                              "add --strategy=mirrored or drop --cpu_devices.")
        if self.strategy == "tpu" and self.jit_compile is False:
            raise ConfigError("--strategy=tpu always compiles with XLA; drop --nojit_compile.")


@dataclasses.dataclass(frozen=True)
class RLConfig(Section):
    """Reinforcement learning's own switches (their defaults are the paper's); a run on
    another data set has no RL section."""
    NAME: ClassVar[str] = "rl"
    TITLE: ClassVar[str] = ("Reinforcement learning (--dataset=navigation_2d / halfcheetah_vel "
                            "/ halfcheetah_dir)")
    trajectories: int = 20
    eval_trajectories: int = 40
    horizon: int = 0
    discount: float = 0.99
    gae_lambda: float = 1.0
    max_kl: float = 0.01
    trpo_cg_iterations: int = 10
    eval_later_inner_lr: float = 0.0
    oracle: bool = False

    def check(self) -> None:
        at_least("trajectories", self.trajectories, 2, "(the baseline and the normalised "
                 "advantages need two)")
        at_least("eval_trajectories", self.eval_trajectories, 2)
        at_least("horizon", self.horizon, 0, "(0: the environment's own)")
        for name in ("discount", "gae_lambda"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise ConfigError(f"--{name}={value!r} is invalid: it must lie in [0, 1].")
        positive("max_kl", self.max_kl)
        at_least("trpo_cg_iterations", self.trpo_cg_iterations, 1)
        positive("eval_later_inner_lr", self.eval_later_inner_lr, allow_zero=True)


# In the order of config.json and --help.
SECTIONS: tuple[type[Section], ...] = (DataConfig, NetworkConfig, LearnerConfig, OptimConfig,
                                       EvalConfig, RunConfig, RLConfig)
# Every flag's section: field names are unique over the sections.
OWNER: dict[str, type[Section]] = {name: s for s in SECTIONS for name in s.field_names()}


def ints(name: str, values) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise ConfigError(f"--{name}={','.join(str(v) for v in values)} is invalid: it must be a "
                          "comma-separated list of integers, e.g. --eval_shots=1,5.") from None


def choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"--{name}={value!r} is not allowed; choose one of {', '.join(allowed)}.")


def at_least(name: str, value: int, low: int, note: str = "") -> None:
    if not isinstance(value, int) or value < low:
        raise ConfigError(f"--{name}={value!r} is invalid: it must be an integer >= {low} "
                          f"{note}".rstrip() + ".")


def at_most(name: str, value: int, high: int, note: str = "") -> None:
    """An integer from 0 to ``high``."""
    at_least(name, value, 0)
    if value > high:
        raise ConfigError(f"--{name}={value} is too large: it must be at most {high} {note}"
                          .rstrip() + ".")


def positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (
        value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"--{name}={value!r} is invalid: it must be a finite number {bound}.")
