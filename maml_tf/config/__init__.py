"""The run's typed configuration: sections built once from flags (or by hand), validated,
frozen.

``Config`` holds one frozen section per concern (``config/sections.py``): ``data``,
``network``, ``learner``, ``optim``, ``evaluation``, ``run`` and, for reinforcement learning
only, ``rl``. Each section checks its own values; the checks that read two sections live here,
in ``Config._check_across``. The flat form stays the public one: ``Config(dataset="omniglot",
way=5, inner_lr=0.4)`` builds the sections (a section may also be passed whole:
``Config(data=DataConfig(...))``), and ``config.way`` reads a field from its section.

config.json holds the sections and, of each, only the switches that apply to the run (a
sinusoid run has no ``way`` and no RL section; an algorithm's own switches appear only with
that algorithm). ``Config.from_dict`` reads that, and the flat config.json of runs written
before the sections, so every existing workdir keeps resuming and evaluating.

Every error names the flag, the value and what is allowed, so a typo in a flagfile stops
the run before anything is built.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from maml_tf.config.flat import (  # noqa: F401 -- part of this API
    flatten_config, resolved_rotations, suggestion, unknown_message)
from maml_tf.config.sections import (  # noqa: F401 -- the constants are part of this API
    ALGORITHM_SWITCHES, ALGORITHMS, BLACK_BOX_LEARNERS, CUSTOM_INSTANCE, DATASETS, EVAL_MODES,
    INNER_OPTIMIZERS, LR_SCHEDULES, MAMLPP_SWITCHES, MANN_WRITES, META_OPTIMIZERS,
    METRIC_LEARNERS, MODELS, NORMS, ON_NAN, OWNER, POOLS, PRECISIONS, RL_ALGORITHMS,
    IMAGE_SOURCES, RL_DATASETS, ROTATIONS, SECTIONS, TFDS_PREFIX, SOURCES, SPLITS, STRATEGIES, ConfigError, DataConfig,
    EvalConfig, LearnerConfig, NetworkConfig, OptimConfig, RLConfig, RunConfig, Section, ints)

RL_SWITCHES = RLConfig.field_names()
_OMNIGLOT_ONLY = ("data_source", "split")
# The switches of the generic image path (data/sources.py); they do not apply to the
# dedicated Omniglot and mini-ImageNet loaders.
GENERIC_ONLY = ("class_split", "split_file", "label_key", "invert_images", "crop_to_boxes", "strict_data", "cache_dir")
_TUPLES = ("eval_shots", "class_split")
_CONV4_ONLY = ("num_filters", "conv_pool", "norm")


@dataclasses.dataclass(frozen=True, init=False)
class Config:
    """Everything that defines a run, in sections. Build it flat (``Config(way=5, ...)``, the
    names are the absl flag names) or by sections; read a field flat (``config.way``) or
    through its section (``config.data.way``)."""
    data: DataConfig
    network: NetworkConfig
    learner: LearnerConfig
    optim: OptimConfig
    evaluation: EvalConfig
    run: RunConfig
    rl: RLConfig | None

    def __init__(self, data: DataConfig | None = None, network: NetworkConfig | None = None,
                 learner: LearnerConfig | None = None, optim: OptimConfig | None = None,
                 evaluation: EvalConfig | None = None, run: RunConfig | None = None,
                 rl: RLConfig | None = None, **flat: Any):
        given = dict(data=data, network=network, learner=learner, optim=optim,
                     evaluation=evaluation, run=run, rl=rl)
        unknown = sorted(set(flat) - set(OWNER))
        if unknown:
            raise ConfigError(unknown_message(unknown))
        for cls in SECTIONS:
            section = given[cls.NAME]
            if section is not None and not isinstance(section, cls):
                raise ConfigError(f"Config({cls.NAME}=...) takes a {cls.__name__}, got "
                                  f"{type(section).__name__}.")
            own = {k: v for k, v in flat.items() if OWNER[k] is cls}
            if cls is RLConfig:
                dataset = flat.get("dataset", (data or DataConfig()).dataset)
                if dataset not in RL_DATASETS:
                    _refuse_rl(rl, own, dataset)
                    object.__setattr__(self, "rl", None)
                    continue
            values = {**(dataclasses.asdict(section) if section is not None else {}), **own}
            object.__setattr__(self, cls.NAME, cls(**values))
        self._check_across()

    def __getattr__(self, name: str) -> Any:
        # Only called for names that are not attributes: a field, read flat from its section.
        section = OWNER.get(name)
        if section is None:
            if name.startswith("__"):
                raise AttributeError(name)
            raise AttributeError(f"'Config' has no field {name!r}{suggestion(name)}")
        value = self.__dict__.get(section.NAME)
        return section.default(name) if value is None else getattr(value, name)

    def replace(self, **flat: Any) -> "Config":
        """A copy with the flat fields ``flat`` changed, validated again."""
        return Config.from_dict({**self.to_flat_dict(), **flat})

    # -- derived values -----------------------------------------------------------------
    @property
    def is_custom_model(self) -> bool:
        """A user's model: ``module:function``, ``file.py:function``, or ``instance`` (a
        ``keras.Model`` object passed to ``maml_tf.train``)."""
        return ":" in self.network.model or self.network.model == CUSTOM_INSTANCE

    @property
    def is_regression(self) -> bool:
        return self.data.dataset == "sinusoid"

    @property
    def is_generic_images(self) -> bool:
        """Images read by the generic path (data/sources.py): a folder, TFDS or Python data."""
        return self.data.dataset in IMAGE_SOURCES or self.data.dataset.startswith(TFDS_PREFIX)

    @property
    def is_rl(self) -> bool:
        """A reinforcement-learning task distribution (maml_tf/rl)."""
        return self.data.dataset in RL_DATASETS

    @property
    def test_inner_lrs(self) -> tuple[float, ...]:
        """RL evaluation: the step size of each test inner step (the paper: 0.1, then 0.05)."""
        later = self.eval_later_inner_lr or self.inner_lr
        return tuple(self.inner_lr if k == 0 else later for k in range(self.test_inner_steps))

    @property
    def first_order(self) -> bool:
        """No second-order term: FOMAML, and Reptile (which has no outer tape at all)."""
        return self.learner.algorithm in ("fomaml", "reptile")

    @property
    def is_metric_learner(self) -> bool:
        """ProtoNets, R2-D2, MetaOptNet, Matching and Relation Networks: the classifier is
        built from the support set, with no inner loop."""
        return self.learner.algorithm in METRIC_LEARNERS

    @property
    def has_inner_loop(self) -> bool:
        """False for the embedding and black-box learners (pre-training has one at test)."""
        return not self.is_metric_learner and self.learner.algorithm not in BLACK_BOX_LEARNERS

    @property
    def shuffled_support(self) -> bool:
        """Whether each task's support set comes in a random order instead of class by class:
        MANN reads it as a sequence in which the classes must interleave."""
        return self.learner.algorithm == "mann"

    @property
    def queries(self) -> int:
        """Query examples per class (classification) or points per task (sinusoid)."""
        if self.data.query:
            return self.data.query
        return 10 if self.is_regression else self.data.shot

    @property
    def test_queries(self) -> int:
        """Queries per class (points per sinusoid task) of the validation and test tasks."""
        return self.evaluation.eval_queries or self.queries

    @property
    def test_inner_steps(self) -> int:
        if not self.has_inner_loop:
            return 0
        return self.evaluation.eval_inner_steps or self.learner.inner_steps

    @property
    def test_shots(self) -> tuple[int, ...]:
        return self.evaluation.eval_shots or (self.data.shot,)

    @property
    def model_name(self) -> str:
        if self.is_custom_model:
            return "custom"
        if self.network.model != "auto":
            return self.network.model
        return "mlp" if self.is_regression or self.is_rl else "conv4"

    @property
    def filters(self) -> int:
        return self.network.num_filters or (32 if self.data.dataset == "mini_imagenet" else 64)

    @property
    def pool(self) -> str:
        if self.network.conv_pool != "auto":
            return self.network.conv_pool
        return "max" if self.data.dataset == "mini_imagenet" else "stride"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, ch)`` of the task images: ``--image_size`` and ``--channels`` of a generic
        image source (default 84x84 RGB); Omniglot 28x28x1, mini-ImageNet 84x84x3."""
        if self.data.dataset == "mini_imagenet":
            return (84, 84, 3)
        if self.is_generic_images:
            size = self.data.image_size or 84
            return (size, size, self.data.channels or 3)
        return (28, 28, 1)

    def rotations(self, split: str) -> str:
        """'augment' or 'none': the rotation policy of ``split``'s classes."""
        return resolved_rotations(self.to_flat_dict())["train_rotations" if split == "train"
                                                       else "eval_rotations"]

    # -- construction and serialisation --------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        """A config from config.json's sections (``{"data": {...}, ...}``), from the flat
        keys of older config.json files and of ``Config(...)``, or from both: flat keys
        override the sections' values. Keys a section leaves out take their defaults."""
        flat = flatten_config(values)
        for name in _TUPLES:
            if flat.get(name) is not None:
                flat[name] = ints(name, flat[name])
        return cls(**flat)

    def to_flat_dict(self) -> dict[str, Any]:
        """Every field by its flag name (a field of an absent section: its default)."""
        d = {name: getattr(self, name) for name in OWNER}
        for name in _TUPLES:
            d[name] = list(d[name])
        return d

    def to_dict(self) -> dict[str, Any]:
        """The sections with the fields that apply to this run (config.json). A field that
        does not apply is left out only at its default, so ``from_dict`` rebuilds exactly
        this config."""
        out: dict[str, Any] = {}
        for cls in SECTIONS:
            section = getattr(self, cls.NAME)
            if section is None:
                continue
            fields = {}
            for name in cls.field_names():
                value = getattr(section, name)
                if self._applies(name) or value != cls.default(name):
                    fields[name] = list(value) if isinstance(value, tuple) else value
            out[cls.NAME] = fields
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_flagfile(self) -> str:
        """Flag lines that rebuild exactly this config, section by section."""
        lines = []
        for name, fields in self.to_dict().items():
            lines.append(f"# -- {name}")
            for key, value in fields.items():
                if isinstance(value, list):
                    value = ",".join(str(v) for v in value)
                elif isinstance(value, bool):
                    value = str(value).lower()
                lines.append(f"--{key}={value}")
        return "\n".join(lines) + "\n"

    def _applies(self, name: str) -> bool:
        """Whether the field ``name`` means something for this run."""
        if name in ALGORITHM_SWITCHES:
            return ALGORITHM_SWITCHES[name] == self.learner.algorithm
        if name in _OMNIGLOT_ONLY:
            return self.data.dataset == "omniglot"
        if name in ("train_rotations", "eval_rotations"):
            return self.data.dataset == "omniglot" or self.is_generic_images
        if name in GENERIC_ONLY:
            return self.is_generic_images
        if name in ("image_size", "channels"):
            return self.is_generic_images
        if name in ("way", "data_dir"):
            return not self.is_regression and not self.is_rl
        if name in ("shot", "query"):
            return not self.is_rl
        if name in _CONV4_ONLY:
            return self.model_name == "conv4"
        if name in ("eval_dataset", "eval_data_dir", "eval_split_file"):
            return not self.is_rl and not self.is_regression
        if name in ("eval_mode", "eval_queries", "eval_shots", "step_metrics_every"):
            return not self.is_rl
        return True

    # -- the checks that read more than one section --------------------------------------
    def warnings(self) -> list[str]:
        """Settings that run but are probably not what was meant."""
        out = []
        adapts = self.has_inner_loop and self.algorithm != "pretrain"
        if adapts and self.inner_steps == 0:
            out.append(f"--inner_steps=0 with --algorithm={self.algorithm}: the inner loop never "
                       "adapts in meta-training, so this trains one network for all tasks.")
        return out

    def _check_across(self) -> None:
        if self.is_rl:
            self._check_rl()
        elif self.meta_optimizer == "trpo":
            raise ConfigError("--meta_optimizer=trpo is the outer loop of reinforcement "
                              f"learning (--dataset={'/'.join(RL_DATASETS)}); use adam or "
                              "sgd here.")
        else:
            self._check_supervised()
        self._check_algorithm()

    def _check_rl(self) -> None:
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
        if self.eval_mode != "transductive" or self.eval_queries or self.eval_dataset:
            raise ConfigError("--eval_mode, --eval_queries and --eval_dataset are few-shot "
                              "evaluation settings; a policy has no queries: drop them.")

    def _check_supervised(self) -> None:
        if self.is_regression and self.eval_dataset:
            raise ConfigError("--eval_dataset evaluates an image classifier on another data "
                              "set's test classes; it does not apply to --dataset=sinusoid.")
        if self.is_regression and self.model_name in ("conv4", "resnet12"):
            raise ConfigError(f"--model={self.model_name} is an image model but --dataset="
                              "sinusoid is 1-D regression: use --model=mlp (or auto) with sinusoid.")
        if self.is_regression and self.conv_pool != "auto":
            raise ConfigError(f"--conv_pool={self.conv_pool} only applies to --model=conv4 on "
                              "image data sets; drop it for --dataset=sinusoid.")
        if self.precision == "mixed_bfloat16" and self.strategy == "tpu":
            raise ConfigError("--precision=mixed_bfloat16 keeps the kernels outside XLA (for "
                              "CPUs); a TPU runs one XLA program: use --precision=bfloat16.")
        if self.model_name in ("custom", "resnet12", "mlp") and (
                self.num_filters or self.conv_pool != "auto" or self.norm != "batch"):
            raise ConfigError("--num_filters, --conv_pool and --norm configure the zoo's Conv-4; "
                              f"drop them with --model={self.model} (its function decides).")
        if self.dataset == "mini_imagenet" and self.model_name == "mlp":
            raise ConfigError("--model=mlp is defined for sinusoid and Omniglot (the paper's "
                              "non-conv baseline); use --model=conv4 for mini_imagenet.")
        # Not refused with sinusoid, the default: Config(way=5, class_split=(64, 16, 20)) is
        # how Python data is described before maml_tf.train(..., data=...) sets the data set.
        if self.dataset in ("omniglot", "mini_imagenet"):
            changed = [n for n in GENERIC_ONLY + ("image_size", "channels")
                       if getattr(self, n) != DataConfig.default(n)]
            if changed:
                raise ConfigError(f"--{changed[0]} configures the generic image path (--dataset="
                                  f"folder, tfds:<name> or data passed from Python); "
                                  f"--dataset={self.dataset} has its own loader: drop it.")
        if self.dataset == "omniglot" and self.split == "lake" and self.way > 659:
            raise ConfigError(f"--way={self.way} exceeds the 659 test characters of the lake split.")

    def _check_algorithm(self) -> None:
        custom = self.model_name != "conv4" and not self.is_regression
        if self.bnwb and not custom and (self.is_regression or self.norm == "none"):
            raise ConfigError("--bnwb learns per-step batch-norm weights, but this network has no "
                              "normalisation layers (sinusoid MLP or --norm=none); drop --bnwb.")
        if self.bnrs and not custom and (self.is_regression or self.norm != "batch"):
            raise ConfigError("--bnrs keeps per-step batch-norm statistics, but this network has "
                              "no batch norm (sinusoid MLP or --norm other than batch); drop --bnrs.")
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
        if self.eval_mode == "support" and self.algorithm == "cnp" and self.is_regression:
            raise ConfigError("--eval_mode=support normalises each task's queries with the "
                              "network's statistics on its support set; the CNP has no batch "
                              "norm and decodes each query alone already: use "
                              "--eval_mode=per_example (or transductive).")
        if self.eval_mode == "support" and self.bnrs:
            raise ConfigError("--bnrs normalises queries with MAML++'s running statistics, so "
                              "--eval_mode=support would not apply: use --eval_mode=per_example.")


def _refuse_rl(section: RLConfig | None, flat: dict[str, Any], dataset: str) -> None:
    """A run on another data set has no RL section: an RL switch set for it is an error."""
    values = {**(dataclasses.asdict(section) if section is not None else {}), **flat}
    for name in RL_SWITCHES:
        if name in values and values[name] != RLConfig.default(name):
            raise ConfigError(f"--{name} is a reinforcement-learning switch; it needs "
                              f"--dataset={'/'.join(RL_DATASETS)} (got --dataset={dataset}).")
