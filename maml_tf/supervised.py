"""The supervised task family: few-shot classification and regression episodes.

``SupervisedFamily`` gives the harness (``maml_tf/harness.py``) what differs for episodes:
the network (the zoo's, the CNP's decoder, or the user's), the distributed episode pipeline
resumed at the restored iteration, the compiled meta-step (``train_step.py``), the
validation and test evaluations on fixed tasks per test shot, and their summaries (the
sinusoid fit as a picture).
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Callable

import keras
import tensorflow as tf
from absl import logging

from maml_tf import data as data_lib
from maml_tf import checkpointing, distribute, evaluation, metrics as metrics_lib, plots
from maml_tf.algorithms import build_learner, train_inner_steps
from maml_tf.algorithms.cnp import REPRESENTATION
from maml_tf.config import Config, ConfigError
from maml_tf.data.errors import DataError
from maml_tf.family import Evaluation, Run, TaskFamily
from maml_tf.harness import Schedule as _Schedule, current_lr
from maml_tf.meta_learner import MetaLearner
from maml_tf.models import get_model, mixed, zoo
from maml_tf.train_step import make_train_step

# What position i of each list of results.json means, by the learner's metric_axis.
INDEX_LEGEND = {
    "inner_steps": "position i of every list is the value after i inner steps on the task's "
                   "support set (0 = before adaptation, up to protocol.inner_steps)",
    "shots_seen": "position i of every list is the value after the learner has read i support "
                  "examples of each class (i support points for regression), 0..shots; the last "
                  "position is the full support set. MANN: position i < shots is the accuracy "
                  "on the support sequence's (i+1)-th instance of each class, predicted before "
                  "its label was shown; the last position is the queries",
    None: "one position: this algorithm has no inner loop",
}

EVAL_MODE_LEGEND = {
    "transductive": "each task's queries were predicted together: batch norm used the "
                    "statistics of the whole query batch (the paper's protocol)",
    "support": "queries were normalised with the statistics of the adapted network on the "
               "task's support set only; a query's prediction does not depend on the other "
               "queries",
    "per_example": "each query was predicted on its own, as the task's only query",
}


class Schedule(_Schedule):
    """The harness's schedule, and which meta-steps score every inner step."""

    def step_metrics(self, step: int, learner=None) -> bool:
        """Whether the meta-step scores the queries after every inner step: one in
        ``step_metrics_every`` and every logged one, so each logging window has some, and
        every one whose update reads them (``learner.scores_every_step_at``)."""
        return (self.log(step) or step % self.config.step_metrics_every == 0 or
                (learner is not None and learner.scores_every_step_at(step - 1)))

    def other_program_follows(self, learner, step: int) -> bool:
        """Whether a later iteration of this run than ``step`` runs the other of the two
        meta-step programs (with and without per-step metrics), so both are compiled."""
        if not learner.reports_inner_steps:
            return False
        now = self.step_metrics(step, learner)
        last = min(self.config.num_iterations, step + self.config.step_metrics_every)
        return any(self.step_metrics(s, learner) != now for s in range(step + 1, last + 1))


def network(config: Config, dtype: str = "float32",
            model_fn: Callable | None = None) -> keras.Model:
    """The network of a supervised ``config``: ``models.get_model``'s, or for the CNP on
    sinusoid its decoder ``(x, representation) -> (mean, scale)`` (the learner builds the
    encoder)."""
    if model_fn is None and config.algorithm == "cnp" and config.is_regression:
        return zoo.mlp(1 + REPRESENTATION, [128, 128], 2, dtype=dtype)
    return get_model(config, dtype=dtype, model_fn=model_fn)


def _xla(config: Config) -> bool:
    """One XLA program per step, or one per layer (--precision=mixed_bfloat16)."""
    return mixed.whole_step_xla(config.precision, config.jit_compile)


class SupervisedFamily(TaskFamily):
    """Episodes of ``data.Episode``: few-shot classification and sinusoid regression."""

    def __init__(self, config: Config, data=None):
        """data: a data set passed from Python (``--dataset=python``), as
        ``data.python_source.prepare`` returns it; None for every other data set."""
        del config   # everything else is read from the run's config
        self._data = data
        self._eval_compiled: set[int] = set()

    # -- set-up -------------------------------------------------------------------------
    def make_model(self, config: Config, model_fn: Callable | None) -> keras.Model:
        model = network(config, model_fn=model_fn)
        if not config.is_regression and not config.is_metric_learner:
            _warn_if_probabilities(model)
        return model

    def make_learner(self, config: Config, model: keras.Model) -> MetaLearner:
        num_classes = None
        if config.algorithm == "pretrain" and not config.is_regression:
            num_classes = data_lib.split_images(config, "train", self._data).num_classes
        return build_learner(config, model, num_classes=num_classes)

    def prepare(self, config: Config, model: keras.Model,
                strategy: tf.distribute.Strategy) -> Config:
        if config.task_chunks:
            return config
        # Recorded as 0 (auto) in config.json, so that a resume on another machine chooses
        # again; the run itself uses the chosen count.
        chunks = distribute.choose_task_chunks(config, model, strategy)
        logging.info("--task_chunks=0: %d chunk(s) of %d task(s) per replica.", chunks,
                     config.meta_batch_size // strategy.num_replicas_in_sync // chunks)
        return config.replace(task_chunks=chunks)

    def preflight(self, run: Run) -> None:
        """The validation and test tasks split evenly over the replicas, and the splits hold
        enough classes and images."""
        config, replicas = run.config, run.strategy.num_replicas_in_sync
        for flag, tasks in (("val_tasks", config.val_tasks), ("eval_tasks", config.eval_tasks)):
            try:
                data_lib.eval_batch_size(tasks, config.meta_batch_size, replicas)
            except ValueError:
                raise ConfigError(f"--{flag}={tasks} cannot be split evenly over the "
                                  f"{replicas} replicas: use a multiple of {replicas}.") from None
        # The test tasks come from --eval_dataset when it is set (cross-domain evaluation).
        for split in ("train", "val", "test"):
            source, data = self._source(config, split)
            for shot in ((config.shot,) if split == "train" else config.test_shots):
                data_lib.check_split(source, split, shot, data)
        if config.is_generic_images and run.manager.latest_checkpoint:
            _check_same_data(run.workdir, data_lib.describe_splits(config, self._data))
        self._eval_step = evaluation.make_eval_step(run.learner, config.test_inner_steps,
                                                    run.strategy, _xla(config),
                                                    config.eval_mode)

    def _source(self, config: Config, split: str):
        """``(config, data)`` of the data a split's tasks come from."""
        if split == "test" and config.eval_dataset:
            return data_lib.test_config(config), None
        return config, self._data

    # -- training -----------------------------------------------------------------------
    def start_training(self, run: Run, start: int) -> None:
        config = run.config
        splits = data_lib.describe_splits(config, self._data)
        if splits is not None:
            checkpointing.atomic_write_json(os.path.join(run.workdir, "split.json"), splits)
        dataset = run.strategy.distribute_datasets_from_function(
            lambda ctx: data_lib.train_dataset(config, ctx, first_step=start, data=self._data))
        self._batches = iter(dataset)
        self._train_step = make_train_step(run)
        self._schedule = Schedule(config)
        self._window = metrics_lib.TrainMetrics(train_inner_steps(config), config.is_regression)
        self._start = self._last_log = self._timed_from = start
        self._t0 = time.time()
        if start == 0:
            metrics_lib.write_layout(config.is_regression)

    def train_step(self, run: Run, step: int) -> str | None:
        config, learner = run.config, run.learner
        first_order = learner.first_order_at(step - 1)
        step_metrics = self._schedule.step_metrics(step, learner)
        batch = next(self._batches)
        first = step == self._start + 1
        if first:
            logging.info("Compiling the meta-step%s ...", " with XLA" if _xla(config) else "")
        out = self._train_step(batch, first_order, step_metrics)
        if first:
            float(out["loss"])   # wait for it: the first step is the compilation
            # The steps with and without per-step metrics are two programs: compile the
            # other now, so that no logging window's rate includes a compilation.
            if self._schedule.other_program_follows(learner, step):
                self._train_step.compile(batch, first_order, not step_metrics)
            logging.info("Compiled the meta-step in %.1f s (not counted in tasks/s).",
                         time.time() - self._t0)
            self._window.window_start, self._timed_from = time.time(), step
        self._window.update(out)
        # Reading the flag waits for the step: only where --on_nan=fail needs it (with skip,
        # the update was already left out on the device and nothing else reads it).
        if config.on_nan == "fail" and float(out["nonfinite"]) > 0:
            return (f"Non-finite meta-loss or meta-gradient at iteration {step} (logging window "
                    f"{self._last_log + 1}..{step}, meta-loss {float(out['loss'])}). Lower "
                    "--inner_lr or --meta_lr, set --grad_clip, or pass --on_nan=skip to skip "
                    "such updates.")
        return None

    def log(self, run: Run, step: int) -> dict[str, float]:
        config = run.config
        values = self._window.write(step, step - self._timed_from, config.meta_batch_size,
                                    config.num_iterations, current_lr(run.optimizer))
        run.learner.write_summaries(step)
        self._last_log = self._timed_from = step
        return values

    def validate(self, run: Run, step: int) -> dict:
        config = run.config
        result = self.evaluate_split(run, "val", config.val_tasks)
        for shot_key, r in result.items():
            metrics_lib.write_eval(f"val_{shot_key}", r, step, run.learner.metric_axis)
        first = result[f"{config.test_shots[0]}shot"]
        key = "loss" if config.is_regression else "accuracy"
        point = {"step": step, key: first[key]["mean"][-1], f"{key}_ci95": first[key]["ci95"][-1]}
        after = {"inner_steps": f"after {config.test_inner_steps} steps",
                 "shots_seen": "after the whole support set"}.get(run.learner.metric_axis, "")
        logging.info("validation at %d: %s %s = %.4f +- %.4f", step, key, after,
                     point[key], point[f"{key}_ci95"])
        if config.is_regression:
            tf.summary.image("sinusoid_fit", plots.sinusoid_fit_image(
                run.learner, config, config.test_shots[0]), step=step)
        return point

    # -- evaluation ---------------------------------------------------------------------
    def evaluate_split(self, run: Run, split: str, num_tasks: int) -> dict:
        """Evaluation of the current meta-weights on fixed tasks of ``split``, per test shot."""
        out = {}
        for shot in run.config.test_shots:
            source, data = self._source(run.config, split)
            ds = _eval_dataset(run, source, split, num_tasks, shot, data)
            if shot not in self._eval_compiled:
                # The first evaluation of each shot traces and compiles the evaluation step.
                self._eval_compiled.add(shot)
                logging.info("Compiling the evaluation step for %d-shot tasks%s (the first %s "
                             "includes it) ...", shot, " with XLA" if _xla(run.config)
                             else "", "validation" if split == "val" else "evaluation")
            out[f"{shot}shot"] = evaluation.evaluate(self._eval_step, ds, num_tasks,
                                                     run.config.is_regression)
        return out

    def evaluate(self, run: Run, summaries: bool) -> Evaluation:
        config = run.config
        test = self.evaluate_split(run, "test", config.eval_tasks)
        if summaries:
            for shot_key, res in test.items():
                metrics_lib.write_eval(f"test_{shot_key}", res, int(run.step.numpy()),
                                       run.learner.metric_axis)
        metric = "mean squared error per query point" if config.is_regression else \
            "softmax cross-entropy per query example"
        protocol = {
            "dataset": config.dataset, "split": config.split if not config.is_regression else None,
            **({"eval_dataset": config.eval_dataset, "eval_data_dir": config.eval_data_dir,
                "eval_split_file": config.eval_split_file} if config.eval_dataset else {}),
            "algorithm": config.algorithm, "model": config.model,
            "way": None if config.is_regression else config.way,
            "shots": list(config.test_shots), "queries": config.test_queries,
            "eval_mode": config.eval_mode,
            "queries_are": "points per task" if config.is_regression else "examples per class",
            "inner_steps": config.test_inner_steps,
            "train_inner_steps": train_inner_steps(config), "inner_lr": config.inner_lr,
            "num_tasks": config.eval_tasks, "eval_seed": config.eval_seed,
            "checkpoint_step": int(run.step.numpy()), "ci": "1.96 * std / sqrt(num_tasks)",
            "replicas": run.strategy.num_replicas_in_sync,
        }
        legend = {
            "index": INDEX_LEGEND[run.learner.metric_axis],
            "loss": metric,
            "accuracy": "fraction of query examples classified correctly",
            "eval_mode": EVAL_MODE_LEGEND[config.eval_mode],
            "mean": "mean over num_tasks fixed test tasks",
            "ci95": "half-width of the 95% confidence interval: 1.96 * std / sqrt(num_tasks) "
                    "(std with ddof=0, as cbfinn/maml)",
            "diverged": "tasks whose value is NaN or infinite (their inner loop diverged); they "
                        "are counted in mean, which is then not finite",
            "finite_mean": "mean over the tasks that did not diverge, for diagnosis only",
        }
        self._axis = run.learner.metric_axis
        return Evaluation(protocol, legend, test)

    def describe(self, results: dict) -> None:
        regression = results["protocol"]["queries_are"] == "points per task"
        key = "loss" if regression else "accuracy"
        steps = results["protocol"]["inner_steps"]
        axis = {"inner_steps": f"after 0..{steps} steps",
                "shots_seen": "after 0..K shots seen"}.get(self._axis, "")
        for shot_key, res in results["test"].items():
            logging.info("test %s %s %s: %s", shot_key, key, axis, " ".join(
                f"{m:.4f}+-{c:.4f}" for m, c in zip(res[key]["mean"], res[key]["ci95"])))

    def results_name(self, config: Config, step: int) -> str:
        return results_name(config, step)


def results_name(config: Config, step: int) -> str:
    """``results-step<N>-<tasks>tasks-<steps>steps-<shots>shot-<queries>queries-<mode>-
    seed<S>``: a supervised evaluation's results file, named by its protocol."""
    shots = "_".join(str(s) for s in config.test_shots)
    # Cross-domain: -on-<data set>[-<its folder>], so that two targets never share a file.
    where = ""
    if config.eval_dataset:
        where = "-on-" + "-".join(re.sub(r"[^A-Za-z0-9_.]+", "_", part).strip("_") for part in
                                  (config.eval_dataset, os.path.basename(
                                      config.eval_data_dir.rstrip("/"))) if part)
    return (f"results-step{step}-{config.eval_tasks}tasks-{config.test_inner_steps}steps-"
            f"{shots}shot-{config.test_queries}queries-{config.eval_mode}-seed{config.eval_seed}"
            f"{where}")


def _warn_if_probabilities(model: keras.Model) -> None:
    """The learners take logits (softmax cross-entropy): a network that ends in a softmax or
    sigmoid trains on squashed outputs and its gradients vanish. Keras warns the same way."""
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    last = layers[-1] if layers else None
    activation = getattr(last, "activation", None)
    name = getattr(activation, "__name__", "") if activation is not None else ""
    if last is not None and (isinstance(last, keras.layers.Softmax) or name in ("softmax", "sigmoid")):
        logging.warning("The model's last layer '%s' (%s) outputs %s, but the learners expect "
                        "logits (they apply softmax cross-entropy themselves): drop its "
                        "activation, or the meta-gradients will be squashed.", last.name,
                        type(last).__name__, "probabilities" if name != "sigmoid" else
                        "sigmoid values")


def _check_same_data(workdir: str, splits: dict) -> None:
    """A resumed or evaluated run of a generic image source must see the data it was trained
    on: the tasks of ``(seed, split, i)`` are only the same for the same classes and images."""
    path = os.path.join(workdir, "split.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = json.load(f)
    if old.get("fingerprint") not in (None, splits["fingerprint"]):
        raise DataError(
            f"The data differs from the data this run was trained on (fingerprint "
            f"{old['fingerprint'][:12]}... in {path}, now {splits['fingerprint'][:12]}...): images "
            "were added, removed or changed, so resuming would not continue the same tasks. "
            "Restore the data as it was, or train in a new --workdir.")
    changed = [s for s in ("train", "val", "test") if old.get(s) not in (None, splits.get(s))]
    if changed:
        raise DataError(f"The {' and '.join(changed)} classes differ from those recorded in "
                        f"{path} (a changed splits.json or split file?): restore it, or train "
                        "in a new --workdir.")


def _eval_dataset(run: Run, source: Config, split: str, num_tasks: int, shot: int, data=None):
    batch = data_lib.eval_batch_size(num_tasks, run.config.meta_batch_size,
                                     run.strategy.num_replicas_in_sync)
    ds = data_lib.eval_dataset(source, split, num_tasks, shot, batch=batch, data=data)
    # Workers split the fixed tasks batch by batch; gathering restores all of them.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    ds = ds.with_options(options)
    return run.strategy.experimental_distribute_dataset(ds)
