"""``run(config, workdir)``: meta-training with validation, checkpoints and summaries,
then the final evaluation. Reads top to bottom:

  1. set-up: strategy, workdir, everything created under ``strategy.scope()``
  2. restore-or-init from the workdir's latest checkpoint
  3. data: the distributed episode pipeline, resumed at the restored iteration
  4. the compiled meta-step
  5. the loop: step, then log / validate / checkpoint as ``Schedule`` says
  6. final evaluation -> results.json
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time

import keras
import tensorflow as tf
from absl import logging

from maml_tf import data as data_lib
from maml_tf import checkpointing, distribute, evaluation, metrics as metrics_lib, plots, provenance
from maml_tf.config import CUSTOM_INSTANCE, Config, ConfigError
from maml_tf.algorithms import build_learner, train_inner_steps
from maml_tf.models import entering_run, get_model, model_spec


class NonFiniteError(FloatingPointError):
    """The meta-loss or meta-gradient became NaN or Inf."""


class RunInterrupted(Exception):
    """SIGTERM or SIGINT stopped the run after a checkpoint of its last iteration."""

    def __init__(self, signum: int, step: int):
        self.exit_code = 128 + signum
        super().__init__(f"Stopped by {signal.Signals(signum).name} after iteration {step}: "
                         f"checkpoint ckpt-{step} is saved; run the same command again to resume.")


class _StopSignals:
    """SIGTERM (preemption) and SIGINT (Ctrl-C) ask the loop to stop after the iteration in
    progress, which is then checkpointed; a second signal stops at once. Handlers can only
    be installed in the main thread; elsewhere signals keep their usual effect."""

    def __enter__(self):
        self.requested, self._previous = None, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping at once")
        self.requested = signum
        logging.warning("%s received: stopping after this iteration (send it again to stop at "
                        "once, without a checkpoint).", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


@dataclasses.dataclass
class Schedule:
    """Decides, after iteration ``step`` (1-based), what to do."""
    config: Config

    def _every(self, step: int, every: int) -> bool:
        return step % every == 0 or step == self.config.num_iterations

    def log(self, step: int) -> bool:
        return self._every(step, self.config.log_every)

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

    def validate(self, step: int) -> bool:
        return self._every(step, self.config.eval_every)

    def checkpoint(self, step: int) -> bool:
        return self._every(step, self.config.checkpoint_every)


@dataclasses.dataclass
class Run:
    """The objects of one run, all created under the strategy's scope."""
    config: Config
    workdir: str
    strategy: tf.distribute.Strategy
    model: keras.Model
    learner: object
    optimizer: keras.optimizers.Optimizer | None
    step: tf.Variable
    manager: tf.train.CheckpointManager


def build(config: Config, workdir: str, overwrite: bool = False, model=None,
          write_config: bool = True) -> Run:
    """Set-up: strategy, workdir, model, optimizer, checkpoint (section 1).

    model: None (``config.model`` builds it), a function ``(input_shape, num_outputs) ->
    keras.Model``, or a built ``keras.Model``; see ``run``. write_config: check the workdir
    against ``config`` and write config.json / flags.cfg (False: evaluation, which only reads).
    """
    config, model_fn = _with_model(config, model)
    strategy = distribute.make_strategy(config)
    workdir = distribute.worker_workdir(workdir)
    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        model = model if isinstance(model, keras.Model) else get_model(config, model_fn=model_fn)
        learner = build_learner(config, model)
        optimizer = make_optimizer(config)
        if optimizer is not None:
            optimizer.build(learner.meta_variables)
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    # After the model and learner are built: a model that cannot be built or run exactly
    # stops the run before anything is written to the workdir.
    if write_config:
        checkpointing.prepare_workdir(workdir, config, overwrite)
    if config.task_chunks == 0:
        # Recorded as 0 (auto) in config.json, so that a resume on another machine chooses
        # again; the run itself uses the chosen count.
        chunks = distribute.choose_task_chunks(config, model, strategy)
        logging.info("--task_chunks=0: %d chunk(s) of %d task(s) per replica.", chunks,
                     config.meta_batch_size // strategy.num_replicas_in_sync // chunks)
        config = dataclasses.replace(config, task_chunks=chunks)
    # The learner holds the algorithm's own meta-parameters (learned rates, ...).
    objects = dict(model=model, step=step, learner=learner)
    if optimizer is not None:   # TRPO keeps no optimizer state
        objects["optimizer"] = optimizer
    ckpt = tf.train.Checkpoint(**objects)
    manager = checkpointing.make_manager(ckpt, os.path.join(workdir, "checkpoints"))
    return Run(config, workdir, strategy, model, learner, optimizer, step, manager)


EVAL_OVERRIDES = ("eval_tasks", "eval_inner_steps", "eval_shots", "eval_seed", "eval_queries",
                  "eval_mode", "data_dir",
                  "data_source", "strategy", "cpu_devices", "jit_compile", "eval_trajectories",
                  "eval_later_inner_lr")


def evaluate_workdir(workdir: str, model=None, **overrides) -> dict:
    """Evaluates the latest checkpoint of ``workdir`` on fixed test tasks (as ``python -m
    maml_tf.evaluate``) and writes ``results-<protocol>.json`` (see ``results_name``).

    overrides: evaluation settings (``EVAL_OVERRIDES``, e.g. ``eval_tasks=50``); the run's
    config.json, flags.cfg and results.json are never changed. model: as for ``run`` when
    the run was given one from Python.
    """
    entering_run()
    unknown = sorted(set(overrides) - set(EVAL_OVERRIDES))
    if unknown:
        raise ConfigError(f"{', '.join('--' + k for k in unknown)} cannot change at evaluation; "
                          f"the evaluation settings are {', '.join('--' + k for k in EVAL_OVERRIDES)}.")
    owned = distribute.worker_workdir(workdir)
    with checkpointing.workdir_lock(owned), checkpointing.temporary_files_in(owned):
        with open(os.path.join(workdir, "config.json")) as f:
            stored = Config.from_dict(json.load(f))
        config = Config.from_dict({**stored.to_dict(), **overrides})
        r = build(config, workdir, model=model, write_config=False)
        if checkpointing.restore_or_init(r.manager) is None:
            raise ConfigError(f"No checkpoint in {workdir}/checkpoints to evaluate.")
        restored = int(r.step.numpy())   # no training here: start = the checkpoint's step
        if config.is_rl:
            from maml_tf.rl import loop
            return loop.final_evaluation(r, start=restored, name=results_name(config, restored))
        _preflight(r)
        step = evaluation.make_eval_step(r.learner, config.test_inner_steps, r.strategy,
                                         config.jit_compile, config.eval_mode)
        return final_evaluation(r, step, start=restored, name=results_name(config, restored))


def _with_model(config: Config, model) -> tuple[Config, object]:
    """(config with the model recorded, the model function or None) for ``build``.

    A module-level function is recorded as ``module:function`` (or ``file.py:function``),
    so that resuming and ``maml_tf.evaluate`` rebuild it; a ``keras.Model`` object is
    recorded as ``instance`` and must be passed again to resume or evaluate.
    """
    if model is None:
        if config.model == CUSTOM_INSTANCE:
            raise ConfigError("This run's model was a keras.Model object passed from Python: pass "
                              "it again (train_loop.run(config, workdir, model=...) or "
                              "maml_tf.evaluate_workdir(workdir, model=...)).")
        return config, None
    if isinstance(model, keras.Model):
        if config.strategy != "default":
            raise ConfigError(f"--strategy={config.strategy} must create the model under its "
                              "scope: pass a function (input_shape, num_outputs) -> keras.Model "
                              "instead of a keras.Model object.")
        return dataclasses.replace(config, model=CUSTOM_INSTANCE), None
    if not callable(model):
        raise ConfigError(f"model must be a keras.Model or a function (input_shape, num_outputs) "
                          f"-> keras.Model, got {type(model).__name__}.")
    spec = model_spec(model)
    if spec is None:
        raise ConfigError(f"The model function {getattr(model, '__qualname__', model)!r} cannot be "
                          "found again by name (a lambda or a nested function), so the run could "
                          "not be resumed or evaluated: define it at the top level of a module.")
    return dataclasses.replace(config, model=spec), model


def make_optimizer(config: Config) -> keras.optimizers.Optimizer | None:
    """The outer optimizer and its learning-rate schedule over ``num_iterations``: constant,
    linear to 0 (Reptile's annealed epsilon) or cosine to ``min_meta_lr`` (MAML++ CA). The
    schedule reads the optimizer's own iteration counter, which checkpoints restore. None
    for TRPO, whose update ``maml_tf.rl`` computes."""
    if config.meta_optimizer == "trpo":
        return None
    lr = config.meta_lr
    horizon = max(config.num_iterations, 1)
    if config.meta_lr_schedule == "linear":
        lr = keras.optimizers.schedules.PolynomialDecay(lr, horizon, end_learning_rate=0.0)
    elif config.meta_lr_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(lr, horizon, alpha=config.min_meta_lr / lr)
    if config.meta_optimizer == "sgd":
        return keras.optimizers.SGD(lr)
    return keras.optimizers.Adam(lr)


def current_lr(optimizer: keras.optimizers.Optimizer) -> float:
    """The outer learning rate now (a mirrored variable or a schedule's value)."""
    lr = optimizer.learning_rate
    return float(tf.convert_to_tensor(lr(optimizer.iterations) if callable(lr) else lr))


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


def make_train_step(run: Run):
    """The meta-step: per-replica meta-gradients (XLA), all-reduced, checked, applied.

    Returns ``train_step(episode, first_order=None, step_metrics=True)``. Both flags are
    Python values, so each setting compiles once (MAML++ switches from first to second order
    once). ``step_metrics``: also score the queries after every inner step (the output's
    ``step_loss`` / ``step_accuracy``, ``[steps + 1]``); without it the step scores only
    the last one, which is the same update at up to half the cost, and returns no per-step
    metrics. ``train_step.compile(episode, first_order, step_metrics)`` compiles (and
    runs, without applying) one setting's meta-gradient, so that timing can exclude it.
    """
    config, strategy, learner = run.config, run.strategy, run.learner
    variables = learner.meta_variables
    steps = train_inner_steps(config)
    replicas = strategy.num_replicas_in_sync

    def chunk_gradient(weights, episode, iteration, first_order, step_metrics):
        loss, grads, per_step = learner.meta_step(weights, episode, steps, iteration,
                                                  first_order, step_metrics)
        acc = per_step.accuracy if per_step.accuracy is not None else per_step.loss
        # Only the meta-variables are trained; the learner's state gets its own update.
        return [loss, grads[:len(variables)], tf.reduce_mean(per_step.loss, 0),
                tf.reduce_mean(acc, 0), list(per_step.state_update or [])]

    @tf.function(jit_compile=config.jit_compile)
    def meta_gradient(weights, episode, iteration, first_order, step_metrics):
        fn = lambda ep: chunk_gradient(weights, ep, iteration, first_order, step_metrics)
        columns = steps + 1 if learner.reports_inner_steps and step_metrics else 1
        loss, grads, step_loss, step_acc, state = (
            fn(episode) if config.task_chunks == 1 else
            _mean_over_chunks(fn, episode, config.task_chunks, weights, len(variables), columns))
        # Each replica averages over its 1/R share of the meta-batch; dividing by R
        # makes the SUM all-reduce below the mean over all tasks of the global batch.
        grads = [g / replicas for g in grads]
        return loss, grads, step_loss, step_acc, state

    def replica_fn(episode, iteration, first_order, step_metrics):
        # Weights enter the XLA cluster as tensors read on this replica's device: XLA
        # cannot use a mirrored variable's copy that lives on another (logical) device.
        loss, grads, step_loss, step_acc, state = meta_gradient(
            [tf.identity(w) for w in learner.meta_weights()], episode, iteration, first_order,
            step_metrics)
        # All-reduce here, in the replica context, so every replica holds the global values.
        ctx = tf.distribute.get_replica_context()
        grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        loss, step_loss, step_acc, state = ctx.all_reduce(tf.distribute.ReduceOp.MEAN,
                                                          [loss, step_loss, step_acc, state])
        return loss, grads, step_loss, step_acc, state

    def apply(grads, state):
        run.optimizer.apply(grads, variables)
        if state:
            learner.update_state(state)
        return tf.constant(True)

    @tf.function
    def gradients(episode, first_order, step_metrics):
        iteration = tf.cast(run.step, tf.float32)
        reduced = strategy.run(lambda ep, it: replica_fn(ep, it, first_order, step_metrics),
                               args=(episode, iteration))
        # Every replica holds the same all-reduced values: take replica 0's.
        loss, grads, step_loss, step_acc, state = tf.nest.map_structure(
            lambda v: strategy.experimental_local_results(v)[0], reduced)
        grad_norm = tf.linalg.global_norm(grads)
        ok = tf.math.is_finite(loss) & tf.math.is_finite(grad_norm)
        if config.grad_clip > 0:
            grads, _ = tf.clip_by_global_norm(grads, config.grad_clip, use_norm=grad_norm)
        return loss, grads, grad_norm, ok, step_loss, step_acc, state

    # The update is a function of its own: a Keras optimizer's apply() traced into the
    # meta-step's function keeps that whole graph alive for the life of the process (measured:
    # 20-50 MB per run, hundreds of MB with XLA), which a notebook or a test suite that
    # trains many times would accumulate; alone, it keeps a few MB.
    @tf.function
    def update(grads, state, ok):
        # A non-finite update is never applied, so the weights (and every checkpoint) stay
        # finite; the host then fails or skips as --on_nan says.
        tf.cond(ok, lambda: apply(grads, state), lambda: tf.constant(False))
        run.step.assign_add(1)

    def setting(first_order, step_metrics):
        # A learner without inner steps scores its queries once either way: one program.
        return (learner.first_order if first_order is None else first_order,
                step_metrics or not learner.reports_inner_steps)

    def train_step(episode, first_order=None, step_metrics=True):
        first_order, step_metrics = setting(first_order, step_metrics)
        loss, grads, grad_norm, ok, step_loss, step_acc, state = gradients(
            episode, first_order, step_metrics)
        update(grads, state, ok)
        out = {"loss": loss, "grad_norm": grad_norm, "nonfinite": 1.0 - tf.cast(ok, tf.float32)}
        if step_metrics:
            out["step_loss"] = step_loss
            if not config.is_regression:
                out["step_accuracy"] = step_acc
        return out

    def compile_setting(episode, first_order=None, step_metrics=True):
        float(gradients(episode, *setting(first_order, step_metrics))[0])

    train_step.compile = compile_setting
    return train_step


def _mean_over_chunks(fn, episode, chunks: int, weights, trained: int, columns: int):
    """The mean of ``fn`` over ``chunks`` equal slices of the episode's tasks, computed one
    slice after another in a while loop, so that only one slice's activations are alive
    (the peak memory of the second-order step shrinks with the chunk size)."""
    parts = tf.nest.map_structure(
        lambda t: None if t is None else tf.reshape(t, [chunks, -1] + t.shape.as_list()[1:]),
        episode)

    def body(i, acc):
        out = fn(tf.nest.map_structure(lambda t: None if t is None else t[i], parts))
        return i + 1, tf.nest.map_structure(lambda a, o: a + o / chunks, acc, out)

    zeros = [tf.zeros([]), [tf.zeros_like(w) for w in weights[:trained]], tf.zeros([columns]),
             tf.zeros([columns]), [tf.zeros_like(w) for w in weights[trained:]]]
    _, acc = tf.while_loop(lambda i, _: i < chunks, body, (tf.constant(0), zeros))
    return acc


def _eval_dataset(run: Run, split: str, num_tasks: int, shot: int):
    batch = data_lib.eval_batch_size(num_tasks, run.config.meta_batch_size,
                                     run.strategy.num_replicas_in_sync)
    ds = data_lib.eval_dataset(run.config, split, num_tasks, shot, batch=batch)
    # Workers split the fixed tasks batch by batch; gathering restores all of them.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    ds = ds.with_options(options)
    return run.strategy.experimental_distribute_dataset(ds)


def evaluate_split(run: Run, split: str, num_tasks: int, eval_step) -> dict:
    """Evaluation of the current meta-weights on fixed tasks of ``split``, per test shot."""
    out = {}
    for shot in run.config.test_shots:
        ds = _eval_dataset(run, split, num_tasks, shot)
        out[f"{shot}shot"] = evaluation.evaluate(eval_step, ds, num_tasks, run.config.is_regression)
    return out


def _check_finite(out: dict, step: int, last_log: int, config: Config) -> None:
    """Fails fast on a non-finite step (whose update was not applied) under --on_nan=fail."""
    if config.on_nan == "fail" and float(out["nonfinite"]) > 0:
        raise NonFiniteError(
            f"Non-finite meta-loss or meta-gradient at iteration {step} (logging window "
            f"{last_log + 1}..{step}, meta-loss {float(out['loss'])}): the update was not "
            "applied and no checkpoint of it was written. Lower --inner_lr or --meta_lr, set "
            "--grad_clip, or pass --on_nan=skip to skip such updates.")


def _validate(run: Run, eval_step, step: int, history: list) -> None:
    result = evaluate_split(run, "val", run.config.val_tasks, eval_step)
    for shot_key, r in result.items():
        metrics_lib.write_eval(f"val_{shot_key}", r, step, run.learner.metric_axis)
    first = result[f"{run.config.test_shots[0]}shot"]
    key = "loss" if run.config.is_regression else "accuracy"
    history.append({"step": step, key: first[key]["mean"][-1], f"{key}_ci95": first[key]["ci95"][-1]})
    after = {"inner_steps": f"after {run.config.test_inner_steps} steps",
             "shots_seen": "after the whole support set"}.get(run.learner.metric_axis, "")
    logging.info("validation at %d: %s %s = %.4f +- %.4f", step, key, after,
                 history[-1][key], history[-1][f"{key}_ci95"])
    if run.config.is_regression:
        tf.summary.image("sinusoid_fit", plots.sinusoid_fit_image(
            run.learner, run.config, run.config.test_shots[0]), step=step)


def run(config: Config, workdir: str, overwrite: bool = False, model=None) -> dict:
    """Meta-trains (or resumes) the run in ``workdir`` and returns its results.

    model: None builds ``config.model``. Your own network: a module-level function
    ``(input_shape, num_outputs) -> keras.Model`` (recorded in the workdir, so that resuming
    and ``python -m maml_tf.evaluate`` rebuild it), or a built ``keras.Model`` (default
    strategy only; pass it again to resume).
    """
    entering_run()
    # One owner per workdir for the whole run (a second run is refused, naming this one),
    # and SIGTERM / SIGINT end it with a checkpoint of the last completed iteration.
    owned = distribute.worker_workdir(workdir)
    with checkpointing.workdir_lock(owned), checkpointing.temporary_files_in(owned), \
            _StopSignals() as stop:
        return _run(config, workdir, overwrite, model, stop)


def _run(config: Config, workdir: str, overwrite: bool, model, stop: _StopSignals) -> dict:
    # -- 1. Set-up --------------------------------------------------------------------
    r = build(config, workdir, overwrite, model)
    if r.config.is_rl:
        from maml_tf.rl import loop
        return loop.run(r, stop, RunInterrupted, NonFiniteError)
    config = r.config
    workdir = r.workdir
    splits = data_lib.describe_splits(config)
    if splits is not None:
        checkpointing.atomic_write_json(os.path.join(workdir, "split.json"), splits)
    _preflight(r)
    # -- 2. Restore-or-init -------------------------------------------------------------
    restored = checkpointing.restore_or_init(r.manager)
    start = int(r.step.numpy())
    logging.info("%s at iteration %d of %d in %s", "Resuming" if restored else "Starting",
                 start, config.num_iterations, workdir)
    # -- 3. Data --------------------------------------------------------------------------
    dataset = r.strategy.distribute_datasets_from_function(
        lambda ctx: data_lib.train_dataset(config, ctx, first_step=start))
    batches = iter(dataset)
    # -- 4. Compiled steps ----------------------------------------------------------------
    train_step = make_train_step(r)
    eval_step = evaluation.make_eval_step(r.learner, config.test_inner_steps, r.strategy,
                                          config.jit_compile, config.eval_mode)
    # -- 5. Loop --------------------------------------------------------------------------
    history = _load_history(workdir, start)
    writer = tf.summary.create_file_writer(os.path.join(workdir, "train"))
    schedule = Schedule(config)
    window = metrics_lib.TrainMetrics(train_inner_steps(config), config.is_regression)
    last_log, timed_from, t0 = start, start, time.time()
    with writer.as_default(), checkpointing.training_session(workdir, start) as session:
        if start == 0:
            metrics_lib.write_layout(config.is_regression)
        elif schedule.validate(start) and not any(h["step"] == start for h in history):
            # The last session stopped in this validation and saved its checkpoint first.
            _validate(r, eval_step, start, history)
            checkpointing.atomic_write_json(os.path.join(workdir, "history.json"), history)
        for step in range(start + 1, config.num_iterations + 1):
            first_order = r.learner.first_order_at(step - 1)
            step_metrics = schedule.step_metrics(step, r.learner)
            batch = next(batches)
            if step == start + 1:
                logging.info("Compiling the meta-step%s ...", " with XLA" if config.jit_compile else "")
            out = train_step(batch, first_order, step_metrics)
            if step == start + 1:
                float(out["loss"])   # wait for it: the first step is the compilation
                # The steps with and without per-step metrics are two programs: compile the
                # other now, so that no logging window's rate includes a compilation.
                if schedule.other_program_follows(r.learner, step):
                    train_step.compile(batch, first_order, not step_metrics)
                logging.info("Compiled the meta-step in %.1f s (not counted in tasks/s).",
                             time.time() - t0)
                window.window_start, timed_from = time.time(), step
            _check_finite(out, step, last_log, config)
            session["to_iteration"] = step
            if stop.requested:
                r.manager.save(checkpoint_number=step)
                raise RunInterrupted(stop.requested, step)
            window.update(out)
            if schedule.log(step):
                window.write(step, step - timed_from, config.meta_batch_size,
                             config.num_iterations, current_lr(r.optimizer))
                r.learner.write_summaries(step)
                last_log = timed_from = step
            if schedule.validate(step):
                try:
                    _validate(r, eval_step, step, history)
                except Exception:
                    # A validation that fails (a bug, memory) must not cost the iterations
                    # since the last checkpoint: the weights are those of `step`. (A second
                    # stop signal raises KeyboardInterrupt: it stops at once, as it says.)
                    r.manager.save(checkpoint_number=step)
                    logging.error("Validation at iteration %d failed; checkpoint ckpt-%d is "
                                  "saved and the same command resumes from it (validating "
                                  "it first).", step, step)
                    raise
                checkpointing.atomic_write_json(os.path.join(workdir, "history.json"), history)
            if schedule.checkpoint(step):
                r.manager.save(checkpoint_number=step)
    train_seconds = time.time() - t0
    if stop.requested:   # during the last validation: the final checkpoint is saved
        raise RunInterrupted(stop.requested, config.num_iterations)
    # -- 6. Final evaluation --------------------------------------------------------------
    return final_evaluation(r, eval_step, train_seconds, start)


def _preflight(r: Run) -> None:
    """Checks what would otherwise fail hours in: the validation and test tasks split evenly
    over the replicas, and the validation and test splits hold enough classes and images."""
    config, replicas = r.config, r.strategy.num_replicas_in_sync
    for flag, tasks in (("val_tasks", config.val_tasks), ("eval_tasks", config.eval_tasks)):
        try:
            data_lib.eval_batch_size(tasks, config.meta_batch_size, replicas)
        except ValueError:
            raise ConfigError(f"--{flag}={tasks} cannot be split evenly over the {replicas} "
                              f"replicas: use a multiple of {replicas}.") from None
    for split in ("train", "val", "test"):
        for shot in ((config.shot,) if split == "train" else config.test_shots):
            data_lib.check_split(config, split, shot)
    for message in config.warnings():
        logging.warning("%s", message)


def _already_written(path: str, step: int) -> bool:
    """Whether ``path`` holds a result of checkpoint ``step`` (then its TensorBoard values
    are written already)."""
    try:
        with open(path) as f:
            return json.load(f)["protocol"]["checkpoint_step"] == step
    except (OSError, ValueError, KeyError):
        return False


def _load_history(workdir: str, start: int) -> list:
    """The validation curve up to the restored iteration ``start``: validations after the
    checkpoint that the run resumes from are redone, so they must not stay twice."""
    path = os.path.join(workdir, "history.json")
    if os.path.exists(path):
        with open(path) as f:
            return [h for h in json.load(f) if h["step"] <= start]
    return []


def results_name(config: Config, step: int) -> str:
    """The results file of an evaluation by ``maml_tf.evaluate``, named by its protocol, so
    that evaluating again with other settings never overwrites another result."""
    if config.is_rl:
        return (f"results-step{step}-{config.eval_tasks}tasks-{config.test_inner_steps}steps-"
                f"{config.eval_trajectories}trajectories-seed{config.eval_seed}")
    shots = "_".join(str(s) for s in config.test_shots)
    return (f"results-step{step}-{config.eval_tasks}tasks-{config.test_inner_steps}steps-"
            f"{shots}shot-{config.test_queries}queries-{config.eval_mode}-seed{config.eval_seed}")


def final_evaluation(r: Run, eval_step, train_seconds: float = 0.0, start: int = 0,
                     name: str = "results") -> dict:
    """Evaluates on the fixed test tasks and writes ``<name>.json`` atomically; TensorBoard
    gets the values under ``eval/`` (``eval/<name>/`` for a named evaluation) once per step:
    an evaluation that repeats a written result does not write them again."""
    config = r.config
    step = int(r.step.numpy())
    path = os.path.join(r.workdir, f"{name}.json")
    t0 = time.time()
    test = evaluate_split(r, "test", config.eval_tasks, eval_step)
    if not _already_written(path, step):
        events = os.path.join(r.workdir, "eval", "" if name == "results" else name)
        with tf.summary.create_file_writer(events).as_default():
            for shot_key, res in test.items():
                metrics_lib.write_eval(f"test_{shot_key}", res, step, r.learner.metric_axis)
    metric = "mean squared error per query point" if config.is_regression else \
        "softmax cross-entropy per query example"
    results = {
        "protocol": {
            "dataset": config.dataset, "split": config.split if not config.is_regression else None,
            "algorithm": config.algorithm, "model": config.model,
            "way": None if config.is_regression else config.way,
            "shots": list(config.test_shots), "queries": config.test_queries,
            "eval_mode": config.eval_mode,
            "queries_are": "points per task" if config.is_regression else "examples per class",
            "inner_steps": config.test_inner_steps,
            "train_inner_steps": train_inner_steps(config), "inner_lr": config.inner_lr,
            "num_tasks": config.eval_tasks, "eval_seed": config.eval_seed,
            "checkpoint_step": step, "ci": "1.96 * std / sqrt(num_tasks)",
            "replicas": r.strategy.num_replicas_in_sync,
        },
        "legend": {
            "index": INDEX_LEGEND[r.learner.metric_axis],
            "loss": metric,
            "accuracy": "fraction of query examples classified correctly",
            "eval_mode": {
                "transductive": "each task's queries were predicted together: batch norm used "
                                "the statistics of the whole query batch (the paper's protocol)",
                "support": "queries were normalised with the statistics of the adapted network "
                           "on the task's support set only; a query's prediction does not depend "
                           "on the other queries",
                "per_example": "each query was predicted on its own, as the task's only query"
            }[config.eval_mode],
            "mean": "mean over num_tasks fixed test tasks",
            "ci95": "half-width of the 95% confidence interval: 1.96 * std / sqrt(num_tasks) "
                    "(std with ddof=0, as cbfinn/maml)",
            "diverged": "tasks whose value is NaN or infinite (their inner loop diverged); they "
                        "are counted in mean, which is then not finite",
            "finite_mean": "mean over the tasks that did not diverge, for diagnosis only",
        },
        "test": test,
        "train_seconds_this_session": round(train_seconds, 1),
        "iterations_this_session": step - start,
        "train_seconds_total": checkpointing.training_time(r.workdir),
        "eval_seconds": round(time.time() - t0, 1),
        "environment": provenance.environment(r.strategy),
    }
    checkpointing.atomic_write_json(path, results)
    for shot_key, res in test.items():
        key = "loss" if config.is_regression else "accuracy"
        axis = {"inner_steps": f"after 0..{config.test_inner_steps} steps",
                "shots_seen": "after 0..K shots seen"}.get(r.learner.metric_axis, "")
        logging.info("test %s %s %s: %s", shot_key, key, axis,
                     " ".join(f"{m:.4f}+-{c:.4f}" for m, c in zip(res[key]["mean"], res[key]["ci95"])))
    return results
