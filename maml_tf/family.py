"""The contract between the run harness (``maml_tf/harness.py``) and a task family: the
``TaskFamily`` hooks, the ``Run`` they receive and the ``Evaluation`` they return.

A family is one kind of tasks: supervised episodes (``maml_tf/supervised.py``), policy
rollouts (``maml_tf/rl/family.py``), or a kind of your own (a subclass passed to
``maml_tf.harness.train``), which needs no change to the harness.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable

import keras
import tensorflow as tf

from maml_tf.config import Config
from maml_tf.meta_learner import MetaLearner


@dataclasses.dataclass
class Evaluation:
    """What a family's evaluation on the fixed test tasks gives for the results file."""
    protocol: dict   # how the numbers were obtained (tasks, steps, seeds, checkpoint, ...)
    legend: dict     # what each key of ``test`` means
    test: dict       # the numbers: per shot or per metric, mean and ci95 lists


class TaskFamily(abc.ABC):
    """What one kind of tasks adds to the harness. A family object belongs to one run;
    it may keep the state of its training session (its data iterator, compiled steps and
    logging window) between the calls, which come in this order::

        make_model, make_learner, prepare            (build)
        preflight                                     (train and evaluate)
        start_training, [validate], train_step, log, validate, ...   (train)
        evaluate                                      (train and evaluate)

    ``run`` is the ``Run`` that ``build`` made; read its ``config`` (``prepare`` may have
    replaced the one the family was made with).
    """

    @abc.abstractmethod
    def make_model(self, config: Config, model_fn: Callable | None) -> keras.Model:
        """The network (under the strategy's scope): ``model_fn(input_shape, num_outputs)``
        when the user gave one, else the family's own for ``config``."""

    @abc.abstractmethod
    def make_learner(self, config: Config, model: keras.Model) -> MetaLearner:
        """The learner of ``config.algorithm`` around ``model`` (under the strategy's scope)."""

    def prepare(self, config: Config, model: keras.Model,
                strategy: tf.distribute.Strategy) -> Config:
        """After the workdir's config.json is written: settings chosen for this machine
        (config.json keeps the user's choice, so a resume elsewhere chooses again)."""
        return config

    def preflight(self, run: "Run") -> None:
        """Checks what would otherwise fail hours into the run (data, shapes)."""

    @abc.abstractmethod
    def start_training(self, run: "Run", start: int) -> None:
        """Opens the training session at iteration ``start``: data resumed where iteration
        ``start + 1`` reads, compiled steps."""

    @abc.abstractmethod
    def train_step(self, run: "Run", step: int) -> str | None:
        """Runs iteration ``step`` (1-based) and advances ``run.step`` to it. The update is
        applied only when finite; otherwise returns one sentence that names what became
        non-finite and how to avoid it (the harness stops or goes on as ``--on_nan`` says)."""

    @abc.abstractmethod
    def log(self, run: "Run", step: int) -> dict[str, float] | None:
        """Writes the training summaries of the window that ends at ``step``; returns their
        values by their TensorBoard names (for the run's Keras callbacks)."""

    @abc.abstractmethod
    def validate(self, run: "Run", step: int) -> dict:
        """Evaluates the weights of ``step`` on the validation tasks, writes the summaries,
        and returns the learning curve's point: ``{"step", <metric>, <metric>_ci95}``."""

    @abc.abstractmethod
    def evaluate(self, run: "Run", summaries: bool) -> Evaluation:
        """Evaluates on the fixed test tasks; writes TensorBoard values (under the default
        writer, which the harness opens) when ``summaries``."""

    @abc.abstractmethod
    def results_name(self, config: Config, step: int) -> str:
        """The results file of a later evaluation by ``maml_tf.evaluate``, named by its
        protocol so that evaluating with other settings never overwrites another."""

    def describe(self, results: dict) -> None:
        """Logs the final results' headline numbers."""


FamilyFactory = Callable[[Config], TaskFamily]


@dataclasses.dataclass
class Run:
    """The objects of one run, all created under the strategy's scope."""
    config: Config
    workdir: str
    strategy: tf.distribute.Strategy
    model: keras.Model
    learner: Any
    optimizer: keras.optimizers.Optimizer | None
    step: tf.Variable
    manager: tf.train.CheckpointManager   # None when built read-only (maml_tf.load)
    family: TaskFamily
    checkpoint: tf.train.Checkpoint | None = None
