"""Training metrics: Keras ``Mean`` accumulators -> console line + ``tf.summary``, then reset;
evaluation scalars, the TensorBoard layout and the HParams summaries of a run."""

from __future__ import annotations

import os
import time

import keras
import tensorflow as tf
from absl import logging
from tensorboard.plugins.hparams import api as hp

from maml_tf import distribute
from maml_tf.config import Config


class TrainMetrics:
    """Accumulates the outputs of the train step over one logging window."""

    def __init__(self, inner_steps: int, regression: bool):
        self.names = ["meta_loss", "grad_norm", "nonfinite"]
        for k in range(inner_steps + 1):
            self.names.append(f"query_loss/step_{k}")
            if not regression:
                self.names.append(f"query_accuracy/step_{k}")
        self.means = {n: keras.metrics.Mean(name=n) for n in self.names}
        self.nonfinite_steps = 0
        self.window_start = time.time()

    def update(self, out: dict) -> None:
        self.means["meta_loss"].update_state(out["loss"])
        self.means["grad_norm"].update_state(out["grad_norm"])
        self.means["nonfinite"].update_state(out["nonfinite"])
        if "step_loss" not in out:   # a meta-step that scored the last inner step only
            return
        for k, v in enumerate(tf.unstack(out["step_loss"])):
            self.means[f"query_loss/step_{k}"].update_state(v)
        if "step_accuracy" in out:
            for k, v in enumerate(tf.unstack(out["step_accuracy"])):
                self.means[f"query_accuracy/step_{k}"].update_state(v)

    def write(self, step: int, steps_in_window: int, tasks_per_step: int, total_steps: int,
              lr: float) -> dict[str, float]:
        """Writes the window's means (the default summary writer must be set), resets.
        The per-step query metrics average the window's meta-steps that computed them
        (``--step_metrics_every``); the meta-loss averages all of its meta-steps."""
        values = {n: float(m.result()) for n, m in self.means.items() if float(m.count) > 0}
        elapsed = max(time.time() - self.window_start, 1e-9)
        # steps_in_window counts the timed steps (the compiling first step is not one): a
        # window of none has no rate yet.
        if steps_in_window > 0:
            values["tasks_per_sec"] = steps_in_window * tasks_per_step / elapsed
        values["learning_rate"] = lr
        for name, v in values.items():
            tf.summary.scalar(name, v, step=step)
        last = [n for n in self.names if n.startswith("query_") and n in values]
        shown = " ".join(f"{n.split('/')[0][6:]}{n[-1]}={values[n]:.4f}" for n in last)
        if steps_in_window > 0:
            eta = _hms((total_steps - step) * elapsed / steps_in_window)
            rate = f"{rate_text(values['tasks_per_sec'])} tasks/s  eta {eta}"
        else:
            rate = "(rate after the next window)"
        logging.info("step %d/%d  meta_loss=%.4f  %s  %s", step, total_steps,
                     values["meta_loss"], shown, rate)
        for m in self.means.values():
            m.reset_state()
        self.window_start = time.time()
        return values


def rate_text(rate: float) -> str:
    """A rate as the console shows it: whole numbers from 10 up, two significant digits
    below (0.41 tasks/s, not 0)."""
    return f"{rate:.0f}" if rate >= 10 else f"{rate:.2g}"


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def write_eval(prefix: str, result: dict, step: int, axis: str | None = "inner_steps") -> None:
    """Evaluation metrics and their CIs as scalars under ``prefix``, one per column:
    ``.../step_k`` after k inner steps, ``.../shots_k`` after k shots seen (the learner's
    ``metric_axis``)."""
    column = "shots" if axis == "shots_seen" else "step"
    for metric in ("loss", "accuracy"):
        if metric not in result:
            continue
        for k, (mean, ci) in enumerate(zip(result[metric]["mean"], result[metric]["ci95"])):
            tf.summary.scalar(f"{prefix}/{metric}/{column}_{k}", mean, step=step)
            tf.summary.scalar(f"{prefix}/{metric}_ci95/{column}_{k}", ci, step=step)


def write_layout(regression: bool) -> None:
    """A TensorBoard custom-scalars layout (the default writer must be set): the per-step
    query curves in one chart each (loss, accuracy; training and validation), instead of one
    chart per inner step."""
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.summary import v1 as summary_v1

    def chart(title, *regexes):
        return layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(
            tag=list(regexes)))
    metrics = ["loss"] if regression else ["loss", "accuracy"]
    charts = [chart(f"train: query {m} after each inner step", rf"^query_{m}/step_\d+$")
              for m in metrics]
    charts += [chart(f"validation: {m} after each inner step (or shots seen)",
                     rf"^val_.*/{m}/(step|shots)_\d+$") for m in metrics]
    layout = layout_pb2.Layout(category=[layout_pb2.Category(title="per inner step",
                                                              chart=charts)])
    tf.summary.experimental.write_raw_pb(
        summary_v1.custom_scalar_pb(layout).SerializeToString(), step=0)


def hparams_of(config: Config) -> dict[str, bool | int | float | str]:
    """The run's flags that apply to it (those of its config.json) as HParams values."""
    return {key: ",".join(str(v) for v in value) if isinstance(value, list) else value
            for section in config.to_dict().values() for key, value in section.items()}


def write_hparams(config: Config, workdir: str) -> None:
    """TensorBoard's HParams dashboard: the run is a session whose hyperparameters are its
    flags, written at the workdir's root, so that ``tensorboard --logdir`` on a directory of
    runs (a sweep, a seed group) lists them all in one table; its metrics are the scalars the
    run writes below it: validation under ``train/``, the final test under ``eval/``, after
    each inner step. Written at the start of every training session (the same values)."""
    with writer(workdir).as_default():
        hp.hparams(hparams_of(config), trial_id=os.path.basename(os.path.normpath(workdir)))


def writer(logdir: str):
    """A TensorBoard writer of ``logdir``; on the non-chief workers of a multi-worker run one
    that writes nothing, so that TensorBoard on the workdir shows the run once (their
    checkpoints, which saving needs, are all they write, below ``workdir/workers/``)."""
    if not distribute.is_chief():
        return tf.summary.create_noop_writer()
    return tf.summary.create_file_writer(logdir)
