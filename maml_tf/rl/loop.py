"""Meta-training and evaluation of policies: ``run`` is ``train_loop.run`` for the
reinforcement-learning data sets, and reads top to bottom:

  1. set-up: the learner, policy and workdir (``train_loop.build``), the environment
  2. restore-or-init from the workdir's latest checkpoint
  3. tasks: iteration i samples its tasks and rollouts from seeds of (seed, i), so a resumed
     run sees the tasks it would have seen
  4. the loop: sample, adapt, sample (``MetaRL.collect``), then TRPO (or Adam); log /
     validate / checkpoint as ``train_loop.Schedule`` says
  5. final evaluation on fixed test tasks -> results.json (and a picture of trajectories)
"""

from __future__ import annotations

import os
import time

import numpy as np
import tensorflow as tf
from absl import logging

from maml_tf import checkpointing, evaluation, plots, provenance
from maml_tf.algorithms import train_inner_steps
from maml_tf.config import Config
from maml_tf.data.tasks import seeds_for, task_seed
from maml_tf.rl.envs import make_env
from maml_tf.rl.meta_rl import MetaRL, RLSettings

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


def run(r, stop, interrupted, nonfinite) -> dict:
    """Meta-trains the run ``r`` (built by ``train_loop.build``). ``stop``: the signal
    handler; ``interrupted`` / ``nonfinite``: train_loop's exception classes."""
    from maml_tf.train_loop import Schedule, _load_history
    # -- 1. Set-up ----------------------------------------------------------------------
    config, workdir, learner = r.config, r.workdir, r.learner
    meta = make_meta_rl(config, learner)
    # -- 2. Restore-or-init -------------------------------------------------------------
    restored = checkpointing.restore_or_init(r.manager)
    start = int(r.step.numpy())
    logging.info("%s at iteration %d of %d in %s", "Resuming" if restored else "Starting",
                 start, config.num_iterations, workdir)
    # -- 3. Tasks ------------------------------------------------------------------------
    stream = task_seed(config.seed, "train", "rl")

    def iteration_seeds(i):
        seeds = seeds_for(stream, i, 3)
        return meta.env.sample_tasks(seeds[0], config.meta_batch_size), seeds[1:]
    # -- 4. Loop -------------------------------------------------------------------------
    history = _load_history(workdir, start)
    writer = tf.summary.create_file_writer(os.path.join(workdir, "train"))
    schedule = Schedule(config)
    window: dict[str, list] = {}
    t0 = time.time()
    with writer.as_default(), checkpointing.training_session(workdir, start) as session:
        for step in range(start + 1, config.num_iterations + 1):
            t_iter = time.time()
            tasks, seeds = iteration_seeds(step - 1)
            batch, info = meta.collect(learner.meta_weights(), tasks, seeds)
            if config.meta_optimizer == "trpo":
                update = meta.trpo_update(batch)
                info.update({"surrogate": update.loss_before, "kl": update.kl,
                             "step_fraction": update.step_fraction})
                finite = np.isfinite(update.loss_before)
            else:
                loss, grads = meta.gradient(batch)
                finite = bool(np.isfinite(float(loss)) and all(
                    np.isfinite(g.numpy()).all() for g in grads))
                if finite:
                    r.optimizer.apply(grads, learner.meta_variables)
                info["surrogate"] = float(loss)
            if not finite and config.on_nan == "fail":
                raise nonfinite(f"Non-finite surrogate loss at iteration {step}: the update was "
                                "not applied and no checkpoint of it was written. Lower "
                                "--inner_lr or --max_kl (--meta_lr with adam), or pass "
                                "--on_nan=skip to skip such updates.")
            r.step.assign(step)
            session["to_iteration"] = step
            info["iteration_seconds"] = time.time() - t_iter
            for k, v in info.items():
                window.setdefault(k, []).append(v)
            if stop.requested:
                r.manager.save(checkpoint_number=step)
                raise interrupted(stop.requested, step)
            if schedule.log(step):
                means = {k: float(np.mean(v)) for k, v in window.items()}
                for k, v in means.items():
                    tf.summary.scalar(k, v, step=step)
                logging.info("step %d/%d  %s", step, config.num_iterations,
                             "  ".join(f"{k}={v:.4g}" for k, v in means.items()))
                window = {}
            if schedule.validate(step):
                summary, tasks_v, kept = evaluate_split(meta, config, "val", config.val_tasks,
                                                        keep_trajectories=True)
                _write_returns("val", summary, step)
                _picture(config, tasks_v, kept, step)
                ret = summary["return"]
                history.append({"step": step, "return": ret["mean"][-1],
                                "return_ci95": ret["ci95"][-1]})
                checkpointing.atomic_write_json(os.path.join(workdir, "history.json"), history)
                logging.info("validation at %d: return after 0..%d steps %s", step,
                             config.test_inner_steps,
                             " ".join(f"{m:.2f}+-{c:.2f}" for m, c in zip(ret["mean"], ret["ci95"])))
            if schedule.checkpoint(step):
                r.manager.save(checkpoint_number=step)
    train_seconds = time.time() - t0
    # -- 5. Final evaluation --------------------------------------------------------------
    return final_evaluation(r, meta, train_seconds, start)


def final_evaluation(r, meta: MetaRL | None = None, train_seconds: float = 0.0,
                     start: int = 0, name: str = "results") -> dict:
    """The return after 0..S inner steps on ``eval_tasks`` fixed test tasks -> ``<name>.json``
    and TensorBoard (``eval/``), with a picture of the trajectories (2D navigation)."""
    config = r.config
    meta = meta or make_meta_rl(config, r.learner)
    step = int(r.step.numpy())
    t0 = time.time()
    summary, tasks, kept = evaluate_split(meta, config, "test", config.eval_tasks,
                                          keep_trajectories=True)
    events = os.path.join(r.workdir, "eval", "" if name == "results" else name)
    with tf.summary.create_file_writer(events).as_default():
        _write_returns("test", summary, step)
        _picture(config, tasks, kept, step)
    results = {
        "protocol": {
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
        },
        "legend": {
            "index": INDEX_LEGEND,
            "return": "undiscounted sum of rewards of an episode, averaged over the task's "
                      "trajectories_per_step episodes",
            "mean": "mean over num_tasks fixed test tasks",
            "ci95": "half-width of the 95% confidence interval: 1.96 * std / sqrt(num_tasks)",
        },
        "test": summary,
        "train_seconds_this_session": round(train_seconds, 1),
        "iterations_this_session": step - start,
        "train_seconds_total": checkpointing.training_time(r.workdir),
        "eval_seconds": round(time.time() - t0, 1),
        "environment": provenance.environment(r.strategy),
    }
    checkpointing.atomic_write_json(os.path.join(r.workdir, f"{name}.json"), results)
    ret = summary["return"]
    logging.info("test return after 0..%d steps: %s", config.test_inner_steps,
                 " ".join(f"{m:.2f}+-{c:.2f}" for m, c in zip(ret["mean"], ret["ci95"])))
    return results
