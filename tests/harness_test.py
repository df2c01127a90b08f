"""A third task family runs through the harness with no change to it.

``LineFamily`` is a kind of tasks the package does not have: 1-D linear regression
``y = a * x`` with a task's slope ``a`` drawn from (seed, iteration, task), a linear model
and MAML. It gives only the family hooks (``maml_tf.family.TaskFamily``); the harness
adds the workdir, checkpoints, resume, history, the non-finite stop and the results file.
"""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from maml_tf import harness
from maml_tf.config import Config
from maml_tf.data.episode import Episode
from maml_tf.family import Evaluation, Run, TaskFamily
from maml_tf.meta_learner import MetaLearner


def _tasks(seed: int, index: int, num_tasks: int, points: int = 5) -> Episode:
    rng = np.random.default_rng([seed, index])
    a = rng.uniform(0.5, 2.0, size=(num_tasks, 1, 1)).astype("float32")
    xs = rng.uniform(-1, 1, size=(2, num_tasks, points, 1)).astype("float32")
    return Episode(tf.constant(xs[0]), tf.constant(a * xs[0]), tf.constant(xs[1]),
                   tf.constant(a * xs[1]))


class LineFamily(TaskFamily):
    nan_at: int | None = None   # a step whose loss the family reports as non-finite

    def __init__(self, config: Config):
        self.seen: list[int] = []

    def make_model(self, config, model_fn):
        return keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False)])

    def make_learner(self, config, model):
        return MetaLearner(model, inner_lr=config.inner_lr, inner_steps=config.inner_steps,
                           loss="mse", metric=None)

    def start_training(self, run: Run, start: int) -> None:
        self.losses: list[float] = []

    def train_step(self, run: Run, step: int) -> str | None:
        loss, grads = run.learner.meta_gradient(_tasks(run.config.seed, step - 1,
                                                       run.config.meta_batch_size))
        run.step.assign(step)
        self.seen.append(step)
        if step == self.nan_at or not np.isfinite(float(loss)):
            return f"Non-finite line loss at iteration {step}."
        run.optimizer.apply(grads, run.learner.meta_variables)
        self.losses.append(float(loss))
        return None

    def log(self, run: Run, step: int) -> None:
        if self.losses:
            tf.summary.scalar("line_loss", np.mean(self.losses), step=step)
        self.losses = []

    def _score(self, run: Run, split: int, num_tasks: int) -> list[float]:
        episode = _tasks(1000 + split, 0, num_tasks)
        return [float(v) for v in tf.reduce_mean(run.learner.evaluate(episode).loss, 0)]

    def validate(self, run: Run, step: int) -> dict:
        return {"step": step, "loss": self._score(run, 1, run.config.val_tasks)[-1]}

    def evaluate(self, run: Run, summaries: bool) -> Evaluation:
        losses = self._score(run, 2, run.config.eval_tasks)
        return Evaluation({"checkpoint_step": int(run.step.numpy()), "family": "lines"},
                          {"loss": "mean squared error after 0..S inner steps"},
                          {"loss": losses})

    def results_name(self, config, step):
        return f"results-lines-step{step}"


def _config(**kw) -> Config:
    return Config(**{"num_iterations": 4, "meta_batch_size": 4, "inner_lr": 0.3,
                     "meta_lr": 0.05, "val_tasks": 4, "eval_tasks": 8, "log_every": 1,
                     "eval_every": 2, "checkpoint_every": 2, "jit_compile": False, **kw})


def test_a_new_family_trains_resumes_and_evaluates_through_the_unchanged_harness(tmp_path):
    workdir = str(tmp_path / "run")
    results = harness.train(LineFamily, _config(), workdir)
    assert results["protocol"] == {"checkpoint_step": 4, "family": "lines"}
    assert results["iterations_this_session"] == 4 and "environment" in results
    # MAML learns the slopes' mean: one inner step then fits each line better than none.
    assert results["test"]["loss"][1] < results["test"]["loss"][0]
    history = json.load(open(os.path.join(workdir, "history.json")))
    assert [h["step"] for h in history] == [2, 4]
    assert json.load(open(os.path.join(workdir, "config.json")))["data"]["dataset"] == "sinusoid"
    assert tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints")).endswith("ckpt-4")

    # A longer run of the same flags resumes at 4 and equals one that never stopped.
    resumed = harness.train(LineFamily, _config(num_iterations=6), workdir)
    straight = harness.train(LineFamily, _config(num_iterations=6), str(tmp_path / "straight"))
    assert resumed["iterations_this_session"] == 2
    assert resumed["test"] == straight["test"]
    assert [h["step"] for h in json.load(open(os.path.join(workdir, "history.json")))] == [2, 4, 6]

    # Evaluation with other settings writes the family's own results file.
    other = harness.evaluate(LineFamily, workdir, eval_tasks=4)
    assert os.path.exists(os.path.join(workdir, "results-lines-step6.json"))
    assert len(other["test"]["loss"]) == 2


def test_the_harness_stops_a_new_family_on_a_non_finite_step_without_a_checkpoint(tmp_path):
    class Breaks(LineFamily):
        nan_at = 3
    workdir = str(tmp_path / "run")
    with pytest.raises(harness.NonFiniteError, match="Non-finite line loss at iteration 3. The "
                       "update was not applied"):
        harness.train(Breaks, _config(), workdir)
    assert tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints")).endswith("ckpt-2")
    skipped = harness.train(Breaks, _config(on_nan="skip"), str(tmp_path / "skip"))
    assert skipped["protocol"]["checkpoint_step"] == 4
