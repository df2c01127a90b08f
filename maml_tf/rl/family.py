"""The reinforcement-learning task family: ``RLFamily`` gives the harness
(``maml_tf/harness.py``) what differs for policies:

  - the network: the paper's Gaussian MLP policy (or the user's), sized by the environment;
  - tasks: iteration i samples its tasks and rollouts from seeds of (seed, i), so a resumed
    run sees the tasks it would have seen;
  - the step: sample, adapt, sample (``MetaRL.collect``), then TRPO (or Adam);
  - validation and the final evaluation: returns after 0..S inner steps on fixed tasks,
    with a picture of the trajectories (2D navigation).
"""

from __future__ import annotations

import time
from typing import Callable

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from maml_tf import evaluation, plots
from maml_tf.algorithms import build_learner, train_inner_steps
from maml_tf.config import Config
from maml_tf.data.tasks import seeds_for, task_seed
from maml_tf.family import Evaluation, Run, TaskFamily
from maml_tf.meta_learner import MetaLearner
from maml_tf.models import build_user_model, load_model_fn
from maml_tf.rl.envs import make_env, spec
from maml_tf.rl.meta_rl import MetaRL, RLSettings
from maml_tf.rl.policy import gaussian_mlp, reinforce_loss

INDEX_LEGEND = ("position i of every list is the value after i policy-gradient inner steps, "
                "each on fresh trajectories of the policy adapted i - 1 times (0 = the "
                "meta-learned policy, before adaptation)")


def make_meta_rl(config: Config, learner) -> MetaRL:
    settings = RLSettings(trajectories=config.trajectories, discount=config.discount,
                          gae_lambda=config.gae_lambda, train_inner_steps=train_inner_steps(config),
                          max_kl=config.max_kl, cg_iterations=config.trpo_cg_iterations,
                          oracle=config.oracle, horizon=config.horizon or None)
    return MetaRL(learner, make_env(config.dataset), settings, jit_compile=config.jit_compile)


def fixed_tasks(meta: MetaRL, config: Config, split: str, num_tasks: int):
    """(tasks ``[num_tasks, D]``, rollout seed ``[2]``) of a split: the same for every run
    with this ``eval_seed``, whatever was trained."""
    seeds = seeds_for(task_seed(config.eval_seed, split, "rl"), 0, 2)
    return meta.env.sample_tasks(seeds[0], num_tasks), seeds[1]


def evaluate_split(meta: MetaRL, config: Config, split: str, num_tasks: int,
                   keep_trajectories: bool = False):
    """Returns after 0..S inner steps on the fixed tasks of ``split``, summarised (mean and
    95% CI over tasks, each task's value the mean over ``eval_trajectories`` episodes)."""
    tasks, seed = fixed_tasks(meta, config, split, num_tasks)
    out = meta.evaluate(tasks, seed, config.test_inner_steps, config.test_inner_lrs,
                        config.eval_trajectories, keep_trajectories)
    returns, kept = out if keep_trajectories else (out, None)
    summary = {"num_tasks": num_tasks, "return": evaluation.summarize(returns)}
    return (summary, tasks, kept) if keep_trajectories else summary


def _write_returns(prefix: str, summary: dict, step: int) -> None:
    for k, (mean, ci) in enumerate(zip(summary["return"]["mean"], summary["return"]["ci95"])):
        tf.summary.scalar(f"{prefix}/return/step_{k}", mean, step=step)
        tf.summary.scalar(f"{prefix}/return_ci95/step_{k}", ci, step=step)


def _picture(config: Config, tasks, kept, step: int) -> None:
    if config.dataset == "navigation_2d":
        tf.summary.image("trajectories", plots.navigation_image(tasks, kept), step=step)


def _returns_line(ret: dict) -> str:
    return " ".join(f"{m:.2f}+-{c:.2f}" for m, c in zip(ret["mean"], ret["ci95"]))


class RLFamily(TaskFamily):
    """Policy-gradient meta-learning on a task distribution of ``maml_tf.rl.envs``."""

    def __init__(self, config: Config):
        del config   # everything is read from the run's config
        self._meta: MetaRL | None = None

    # -- set-up -------------------------------------------------------------------------
    def make_model(self, config: Config, model_fn: Callable | None) -> keras.Model:
        # A policy's observation; an oracle also observes its task (the goal).
        env = spec(config.dataset)
        observation = env.observation_dim + (env.task_dim if config.oracle else 0)
        if model_fn is not None or config.is_custom_model:
            fn = model_fn or load_model_fn(config.model)
            # Outputs: the action's mean and log-std.
            return build_user_model(fn, (observation,), 2 * env.action_dim)
        return gaussian_mlp(observation, env.action_dim)

    def make_learner(self, config: Config, model: keras.Model) -> MetaLearner:
        return build_learner(config, model, loss=reinforce_loss, metric=None)

    def meta(self, run: Run) -> MetaRL:
        if self._meta is None:
            self._meta = make_meta_rl(run.config, run.learner)
        return self._meta

    # -- training -----------------------------------------------------------------------
    def start_training(self, run: Run, start: int) -> None:
        self._stream = task_seed(run.config.seed, "train", "rl")
        self._window: dict[str, list] = {}

    def train_step(self, run: Run, step: int) -> str | None:
        config, learner, meta = run.config, run.learner, self.meta(run)
        t_iter = time.time()
        seeds = seeds_for(self._stream, step - 1, 3)
        tasks = meta.env.sample_tasks(seeds[0], config.meta_batch_size)
        batch, info = meta.collect(learner.meta_weights(), tasks, seeds[1:])
        if config.meta_optimizer == "trpo":
            update = meta.trpo_update(batch)
            info.update({"surrogate": update.loss_before, "kl": update.kl,
                         "step_fraction": update.step_fraction})
            finite = bool(np.isfinite(update.loss_before))
        else:
            loss, grads = meta.gradient(batch)
            finite = bool(np.isfinite(float(loss)) and all(
                np.isfinite(g.numpy()).all() for g in grads))
            if finite and run.optimizer is not None:   # Adam (TRPO has none)
                run.optimizer.apply(grads, learner.meta_variables)
            info["surrogate"] = float(loss)
        run.step.assign(step)
        info["iteration_seconds"] = time.time() - t_iter
        for k, v in info.items():
            self._window.setdefault(k, []).append(v)
        if not finite:
            return (f"Non-finite surrogate loss at iteration {step}. Lower --inner_lr or "
                    "--max_kl (--meta_lr with adam), or pass --on_nan=skip to skip such updates.")
        return None

    def log(self, run: Run, step: int) -> dict[str, float]:
        means = {k: float(np.mean(v)) for k, v in self._window.items()}
        for k, v in means.items():
            tf.summary.scalar(k, v, step=step)
        logging.info("step %d/%d  %s", step, run.config.num_iterations,
                     "  ".join(f"{k}={v:.4g}" for k, v in means.items()))
        self._window = {}
        return means

    def validate(self, run: Run, step: int) -> dict:
        config = run.config
        summary, tasks, kept = evaluate_split(self.meta(run), config, "val", config.val_tasks,
                                              keep_trajectories=True)
        _write_returns("val", summary, step)
        _picture(config, tasks, kept, step)
        ret = summary["return"]
        logging.info("validation at %d: return after 0..%d steps %s", step,
                     config.test_inner_steps, _returns_line(ret))
        return {"step": step, "return": ret["mean"][-1], "return_ci95": ret["ci95"][-1]}

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(self, run: Run, summaries: bool) -> Evaluation:
        config, meta = run.config, self.meta(run)
        step = int(run.step.numpy())
        summary, tasks, kept = evaluate_split(meta, config, "test", config.eval_tasks,
                                              keep_trajectories=True)
        if summaries:
            _write_returns("test", summary, step)
            _picture(config, tasks, kept, step)
        protocol = {
            "dataset": config.dataset, "algorithm": config.algorithm, "model": config.model,
            "oracle": config.oracle, "inner_steps": config.test_inner_steps,
            "inner_lrs": list(config.test_inner_lrs),
            "train_inner_steps": train_inner_steps(config),
            "trajectories_per_step": config.eval_trajectories,
            "horizon": meta.horizon, "num_tasks": config.eval_tasks,
            "eval_seed": config.eval_seed, "checkpoint_step": step,
            "meta_optimizer": config.meta_optimizer, "meta_batch_size": config.meta_batch_size,
            "train_trajectories": config.trajectories,
            "ci": "1.96 * std / sqrt(num_tasks)",
        }
        legend = {
            "index": INDEX_LEGEND,
            "return": "undiscounted sum of rewards of an episode, averaged over the task's "
                      "trajectories_per_step episodes",
            "mean": "mean over num_tasks fixed test tasks",
            "ci95": "half-width of the 95% confidence interval: 1.96 * std / sqrt(num_tasks)",
        }
        return Evaluation(protocol, legend, summary)

    def describe(self, results: dict) -> None:
        logging.info("test return after 0..%d steps: %s", results["protocol"]["inner_steps"],
                     _returns_line(results["test"]["return"]))

    def results_name(self, config: Config, step: int) -> str:
        return (f"results-step{step}-{config.eval_tasks}tasks-{config.test_inner_steps}steps-"
                f"{config.eval_trajectories}trajectories-seed{config.eval_seed}")
