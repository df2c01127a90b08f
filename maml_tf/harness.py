"""The run harness: what every run does, whatever its tasks are.

``train(family, config, workdir)`` owns the workdir lock, the stop signals (the handlers of
``stop_signals``), restore-or-init (with the damaged-checkpoint fallback of
``checkpointing``), the schedule, ``sessions.json``, ``history.json``, the non-finite stop,
checkpoints, validation bookkeeping, the results file and its provenance. A *task family*
(``family.TaskFamily``: supervised episodes in ``maml_tf/supervised.py``, policy rollouts in
``maml_tf/rl/family.py``) provides only what differs: its network, its learner, its data or
environment, its train step, its validation, its evaluation and its summaries. The harness
imports no family; a new family is a subclass passed to ``train`` and needs no change here.

``train`` reads top to bottom:

  1. set-up: strategy, workdir, everything created under ``strategy.scope()`` (``build``)
  2. restore-or-init from the workdir's latest checkpoint
  3. the family's training session: its data and compiled step, resumed at the restored
     iteration
  4. the loop: step, then log / validate / checkpoint as ``Schedule`` says
  5. final evaluation -> results.json
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Callable

import keras
import tensorflow as tf
from absl import logging

from maml_tf import callbacks as callbacks_lib, checkpointing, distribute, metrics, plots, provenance
from maml_tf.config import CUSTOM_INSTANCE, Config, ConfigError
from maml_tf.family import FamilyFactory, Run, TaskFamily  # noqa: F401 -- TaskFamily: API
from maml_tf.models import entering_run, model_spec
from maml_tf.stop_signals import RunInterrupted, StopSignals

# The settings ``evaluate`` may change for one evaluation of a trained run.
EVAL_OVERRIDES = ("eval_tasks", "eval_inner_steps", "eval_shots", "eval_seed", "eval_queries",
                  "eval_mode", "data_dir", "data_source", "strategy", "cpu_devices",
                  "jit_compile", "eval_trajectories", "eval_later_inner_lr", "cache_dir",
                  "eval_dataset", "eval_data_dir", "eval_split_file")


class NonFiniteError(FloatingPointError):
    """The meta-loss or meta-gradient became NaN or Inf."""


@dataclasses.dataclass
class Schedule:
    """Decides, after iteration ``step`` (1-based), what to do. The last iteration of the
    run does everything."""
    config: Config

    def _every(self, step: int, every: int) -> bool:
        return step % every == 0 or step == self.config.num_iterations

    def log(self, step: int) -> bool:
        return self._every(step, self.config.run.log_every)

    def validate(self, step: int) -> bool:
        return self._every(step, self.config.evaluation.eval_every)

    def checkpoint(self, step: int) -> bool:
        return self._every(step, self.config.run.checkpoint_every)


def build(family: FamilyFactory, config: Config, workdir: str, overwrite: bool = False,
          model=None, write_config: bool = True, read_only: bool = False) -> Run:
    """Set-up: strategy, workdir, model, optimizer, checkpoint (section 1).

    family: called with the config, returns the run's ``TaskFamily``. model: None (the
    family builds ``config.model``), a function ``(input_shape, num_outputs) -> keras.Model``,
    or a built ``keras.Model``; see ``train``. write_config: check the workdir against
    ``config`` and write config.json / flags.cfg (False: evaluation, which only reads).
    read_only: touch nothing in the workdir (``maml_tf.load``, which may read a run that is
    training): no checkpoint manager (``Run.manager`` is None); restore ``Run.checkpoint``
    with ``checkpointing.restore_for_reading``.
    """
    distribute.check_memory(config)   # before anything is built or written
    config, model_fn = _with_model(config, model)
    tasks = family(config)
    strategy = distribute.make_strategy(config)
    workdir = distribute.worker_workdir(workdir)
    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        model = model if isinstance(model, keras.Model) else tasks.make_model(config, model_fn)
        learner = tasks.make_learner(config, model)
        optimizer = make_optimizer(config)
        if optimizer is not None:
            optimizer.build(learner.meta_variables)
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    # After the model and learner are built: a model that cannot be built or run exactly
    # stops the run before anything is written to the workdir.
    if write_config and not read_only:
        checkpointing.prepare_workdir(workdir, config, overwrite)
    config = tasks.prepare(config, model, strategy)
    # The learner holds the algorithm's own meta-parameters (learned rates, ...).
    objects = dict(model=model, step=step, learner=learner)
    if optimizer is not None:   # TRPO keeps no optimizer state
        objects["optimizer"] = optimizer
    ckpt = tf.train.Checkpoint(**objects)
    manager = None if read_only else checkpointing.make_manager(
        ckpt, os.path.join(workdir, "checkpoints"))
    return Run(config, workdir, strategy, model, learner, optimizer, step, manager, tasks, ckpt)


def train(family: FamilyFactory, config: Config, workdir: str, overwrite: bool = False,
          model=None, callbacks=None) -> dict:
    """Meta-trains (or resumes) the run in ``workdir`` and returns its results.

    family: called with the config, returns the run's ``TaskFamily``. model: None builds
    ``config.model``. Your own network: a module-level function ``(input_shape,
    num_outputs) -> keras.Model`` (recorded in the workdir, so that resuming and ``python -m
    maml_tf.evaluate`` rebuild it), or a built ``keras.Model`` (default strategy only; pass
    it again to resume). callbacks: ``keras.callbacks.Callback`` objects (see
    ``maml_tf/callbacks.py``).
    """
    callbacks = callbacks_lib.checked(callbacks)
    entering_run()
    # One owner per workdir for the whole run (a second run is refused, naming this one),
    # and SIGTERM / SIGINT end it with a checkpoint of the last completed iteration.
    owned = distribute.worker_workdir(workdir)
    with checkpointing.workdir_lock(owned), checkpointing.temporary_files_in(owned), \
            StopSignals() as stop:
        return _train(family, config, workdir, overwrite, model, stop, callbacks)


def _train(family: FamilyFactory, config: Config, workdir: str, overwrite: bool, model,
           stop: StopSignals, callbacks) -> dict:
    # -- 1. Set-up --------------------------------------------------------------------
    r = build(family, config, workdir, overwrite, model)
    stop.reinstall()
    config, workdir, tasks = r.config, r.workdir, r.family
    _preflight(r)
    # -- 2. Restore-or-init -------------------------------------------------------------
    restored = checkpointing.restore_or_init(r.manager)
    start = int(r.step.numpy())
    logging.info("%s at iteration %d of %d in %s", "Resuming" if restored else "Starting",
                 start, config.num_iterations, workdir)
    metrics.write_hparams(config, workdir)
    history = load_history(workdir, start)
    writer = metrics.writer(os.path.join(workdir, "train"))
    schedule = Schedule(config)
    hooks = callbacks_lib.RunCallbacks(callbacks, r.model, config.num_iterations)
    hooks.begin()
    t0 = time.time()
    with writer.as_default(), checkpointing.training_session(workdir, start) as session:
        tasks.start_training(r, start)   # -- 3. The family's training session
        # -- 4. Loop ----------------------------------------------------------------------
        if start and schedule.validate(start) and not any(h["step"] == start for h in history):
            # The last session stopped in this validation and saved its checkpoint first.
            _validate(r, start, history)
        # A run that --stop_when_flat ended stays ended (unless the rule was loosened).
        flat = bool(start) and _flat(config, history, start) is not None
        for step in range(start + 1, start if flat else config.num_iterations + 1):
            problem = tasks.train_step(r, step)
            if problem is not None and config.on_nan == "fail":
                raise NonFiniteError(f"{problem} The update was not applied and no checkpoint "
                                     "of it was written.")
            session.to_iteration = step
            # All workers of a multi-worker run stop at the same iteration, whichever got the signal.
            if distribute.any_worker(r.strategy, stop.requested is not None):
                r.manager.save(checkpoint_number=step)
                raise RunInterrupted(stop.requested or signal.SIGTERM, step)
            if schedule.log(step):
                hooks.window(step, tasks.log(r, step))
            if schedule.validate(step):
                _validate(r, step, history)
                hooks.validated(step, history[-1])
                flat = _flat(config, history, step) is not None
            if schedule.checkpoint(step) or hooks.stop_requested or flat:
                r.manager.save(checkpoint_number=step)
                session.record()   # a kill -9 from here on keeps this session's time
            if flat:
                break
            if hooks.stop_requested and step < config.num_iterations:
                logging.warning("A callback stopped meta-training after iteration %d (checkpoint "
                                "ckpt-%d); evaluating it. The same command resumes the training.",
                                step, step)
                break
    train_seconds = time.time() - t0
    if stop.requested:   # during the last validation: the final checkpoint is saved
        raise RunInterrupted(stop.requested, int(r.step.numpy()))
    # -- 5. Final evaluation --------------------------------------------------------------
    done = int(r.step.numpy())
    stopped = _flat(config, history, done)
    if stopped:
        logging.info("Validation has not risen beyond its 95%% CI since iteration %d, %d "
                     "iterations before %d (--stop_when_flat=%d): meta-training ends there.",
                     stopped["last_rise"], stopped["flat_iterations"], done,
                     stopped["stop_when_flat"])
    stop.at_once(done)
    logging.info("Final evaluation of ckpt-%d (a stop signal now ends it at once; the same "
                 "command evaluates again).", done)
    try:
        results = final_evaluation(r, train_seconds, start, before_writing=stop.check,
                                   stopped=stopped)
    except Exception:
        stop.check()   # a stop raised inside TensorFlow may come back as another error
        raise
    distribute.any_worker(r.strategy, False)   # a barrier: the workers of a cluster end together
    hooks.end(results)
    return results


def _validate(r: Run, step: int, history: list) -> None:
    """One point of the learning curve, appended to ``history`` and history.json."""
    try:
        history.append(r.family.validate(r, step))
    except BaseException:
        # A validation that fails (a bug, memory) or is cut short (a second stop signal,
        # KeyboardInterrupt) must not cost the iterations since the last checkpoint: the
        # weights are those of `step`, and saving them takes a second.
        r.manager.save(checkpoint_number=step)
        logging.error("Validation at iteration %d failed or was interrupted; checkpoint ckpt-%d is saved and the "
                      "same command resumes from it (validating it first).", step, step)
        raise
    checkpointing.atomic_write_json(os.path.join(r.workdir, "history.json"), history)


def _flat(config: Config, history: list, step: int) -> dict | None:
    """What results.json records when ``--stop_when_flat`` ends the run at ``step`` (a
    validation whose curve has been flat for that long), else None."""
    every = config.evaluation.stop_when_flat
    if not every or not history or history[-1]["step"] != step:
        return None
    rise, flat = plots.flat_for(history)
    if flat < every:
        return None
    return {"at_iteration": step, "last_rise": rise, "flat_iterations": flat,
            "stop_when_flat": every, "metric": plots.curve_metric(history[-1])[0]}


def _preflight(r: Run) -> None:
    r.family.preflight(r)
    accelerated = bool(tf.config.list_logical_devices("GPU"))
    for message in r.config.warnings() + hardware_warnings(r.config, provenance.cpu_flags(),
                                                           accelerated):
        logging.warning("%s", message)


def hardware_warnings(config: Config, flags: frozenset[str] | None, accelerated: bool) -> list[str]:
    """Settings that run, but slowly on this machine's CPU (``flags``: ``provenance.cpu_flags``)."""
    if (config.precision != "mixed_bfloat16" or accelerated
            or provenance.bfloat16_hardware(flags) is not False):
        return []
    return ["--precision=mixed_bfloat16 on a CPU without bfloat16 units (its /proc/cpuinfo "
            "lists neither avx512_bf16 nor amx_bf16): TensorFlow's oneDNN kernels emulate "
            "bfloat16 here. On an AMX Xeon with oneDNN capped at AVX-512 without BF16, a "
            "bfloat16 matmul ran at 56 GFLOP/s against 245 in float32, and the meta-step at "
            "0.97x (Omniglot 20-way 5-shot) and 0.68x (mini-ImageNet 5-way 1-shot) the speed "
            "of float32 with 1.4-1.5x its memory (benchmarks/README.md). Use the default "
            "--precision=float32 on this machine; mixed_bfloat16 paid (1.1-1.4x at 20-way "
            "5-shot) only with AVX-512 BF16 or AMX."]


def evaluate(family: FamilyFactory, workdir: str, model=None, **overrides) -> dict:
    """Evaluates the latest checkpoint of ``workdir`` on fixed test tasks (as ``python -m
    maml_tf.evaluate``) and writes ``results-<protocol>.json`` (the family's
    ``results_name``).

    family: called with the run's config, returns its ``TaskFamily``. overrides: evaluation
    settings (``EVAL_OVERRIDES``, e.g. ``eval_tasks=50``); the run's config.json, flags.cfg
    and results.json are never changed. model: as for ``train`` when the run was given one
    from Python.
    """
    entering_run()
    unknown = sorted(set(overrides) - set(EVAL_OVERRIDES))
    if unknown:
        raise ConfigError(f"{', '.join('--' + k for k in unknown)} cannot change at evaluation; "
                          f"the evaluation settings are {', '.join('--' + k for k in EVAL_OVERRIDES)}.")
    owned = distribute.worker_workdir(workdir)
    with checkpointing.workdir_lock(owned), checkpointing.temporary_files_in(owned):
        config = Config.from_dict({**read_config(workdir).to_flat_dict(), **overrides})
        r = build(family, config, workdir, model=model, write_config=False)
        if checkpointing.restore_or_init(r.manager) is None:
            raise ConfigError(f"No checkpoint in {workdir}/checkpoints to evaluate.")
        restored = int(r.step.numpy())   # no training here: start = the checkpoint's step
        _preflight(r)
        return final_evaluation(r, start=restored,
                                name=r.family.results_name(r.config, restored))


def read_config(workdir: str) -> Config:
    """The config of the run in ``workdir``: its config.json, sectioned or (written before
    the sections) flat."""
    with open(os.path.join(workdir, "config.json")) as f:
        return Config.from_dict(json.load(f))


def final_evaluation(r: Run, train_seconds: float = 0.0, start: int = 0,
                     name: str = "results", before_writing=None, stopped: dict | None = None) -> dict:
    """Evaluates on the fixed test tasks and writes ``<name>.json`` atomically; TensorBoard
    gets the values under ``eval/`` (``eval/<name>/`` for a named evaluation) once per step:
    an evaluation that repeats a written result does not write them again. ``before_writing``
    (no arguments) is called before ``<name>.json`` is written, and may raise to keep it
    unwritten. stopped: ``--stop_when_flat`` ended the training here (``_flat``)."""
    step = int(r.step.numpy())
    path = os.path.join(r.workdir, f"{name}.json")
    t0 = time.time()
    events = os.path.join(r.workdir, "eval", "" if name == "results" else name)
    with metrics.writer(events).as_default():
        out = r.family.evaluate(r, summaries=not _already_written(path, step))
    if before_writing is not None:
        before_writing()
    results = {
        "protocol": out.protocol,
        "legend": out.legend,
        "test": out.test,
        "train_seconds_this_session": round(train_seconds, 1),
        "iterations_this_session": step - start,
        "train_seconds_total": checkpointing.training_time(r.workdir),
        "eval_seconds": round(time.time() - t0, 1),
        "environment": provenance.environment(r.strategy),
        **({"stopped_when_flat": stopped} if stopped else {}),
    }
    checkpointing.atomic_write_json(path, results)
    r.family.describe(results)
    logging.info("Results of checkpoint ckpt-%d written to %s", step, path)
    return results


def _already_written(path: str, step: int) -> bool:
    """Whether ``path`` holds a result of checkpoint ``step`` (then its TensorBoard values
    are written already)."""
    try:
        with open(path) as f:
            return json.load(f)["protocol"]["checkpoint_step"] == step
    except (OSError, ValueError, KeyError):
        return False


def load_history(workdir: str, start: int) -> list:
    """The validation curve up to the restored iteration ``start``: validations after the
    checkpoint that the run resumes from are redone, so they must not stay twice."""
    path = os.path.join(workdir, "history.json")
    if os.path.exists(path):
        with open(path) as f:
            return [h for h in json.load(f) if h["step"] <= start]
    return []


def _with_model(config: Config, model) -> tuple[Config, Callable | None]:
    """(config with the model recorded, the model function or None) for ``build``.

    A module-level function is recorded as ``module:function`` (or ``file.py:function``),
    so that resuming and ``maml_tf.evaluate`` rebuild it; a ``keras.Model`` object is
    recorded as ``instance`` and must be passed again to resume or evaluate.
    """
    if model is None:
        if config.model == CUSTOM_INSTANCE:
            raise ConfigError("This run's model was a keras.Model object passed from Python: pass "
                              "it again (maml_tf.train(config, workdir, model=...) or "
                              "maml_tf.evaluate_workdir(workdir, model=...)).")
        return config, None
    if isinstance(model, keras.Model):
        if config.strategy != "default":
            raise ConfigError(f"--strategy={config.strategy} must create the model under its "
                              "scope: pass a function (input_shape, num_outputs) -> keras.Model "
                              "instead of a keras.Model object.")
        return config.replace(model=CUSTOM_INSTANCE), None
    if not callable(model):
        raise ConfigError(f"model must be a keras.Model or a function (input_shape, num_outputs) "
                          f"-> keras.Model, got {type(model).__name__}.")
    spec = model_spec(model)
    if spec is None:
        raise ConfigError(f"The model function {getattr(model, '__qualname__', model)!r} cannot be "
                          "found again by name (a lambda or a nested function), so the run could "
                          "not be resumed or evaluated: define it at the top level of a module.")
    return config.replace(model=spec), model


def make_optimizer(config: Config) -> keras.optimizers.Optimizer | None:
    """The outer optimizer and its learning-rate schedule over ``num_iterations``: constant,
    linear to 0 (Reptile's annealed epsilon) or cosine to ``min_meta_lr`` (MAML++ CA). The
    schedule reads the optimizer's own iteration counter, which checkpoints restore. None
    for TRPO, whose update ``maml_tf.rl`` computes."""
    optim = config.optim
    if optim.meta_optimizer == "trpo":
        return None
    lr = optim.meta_lr
    horizon = max(optim.num_iterations, 1)
    if optim.meta_lr_schedule == "linear":
        lr = keras.optimizers.schedules.PolynomialDecay(lr, horizon, end_learning_rate=0.0)
    elif optim.meta_lr_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(lr, horizon, alpha=optim.min_meta_lr / lr)
    if optim.meta_optimizer == "sgd":
        return keras.optimizers.SGD(lr)
    return keras.optimizers.Adam(lr)


def current_lr(optimizer: keras.optimizers.Optimizer) -> float:
    """The outer learning rate now (a mirrored variable or a schedule's value)."""
    lr = optimizer.learning_rate
    return float(tf.convert_to_tensor(lr(optimizer.iterations) if callable(lr) else lr))
