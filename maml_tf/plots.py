"""Figures for TensorBoard and runs/: sinusoid fits, learning curves (matplotlib, Agg)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from maml_tf.data import sinusoid  # noqa: E402
from maml_tf.data.tasks import task_seed  # noqa: E402


def sinusoid_fit_image(learner, config, shot: int, steps=(0, 1, 10)) -> tf.Tensor:
    """uint8 ``[1, H, W, 4]``: a fixed test task's true curve, its K support points and the
    model's fit after each of ``steps`` inner steps (a CNP: its mean and uncertainty band)."""
    stream = task_seed(config.eval_seed, "test", f"shot{shot}")
    sx, sy, _, _ = sinusoid.sample_task(stream, tf.constant(0, tf.int64), shot, 1)
    amp, phase = sinusoid.task_params(stream, tf.constant(0, tf.int64))
    grid = np.linspace(-5, 5, 200, dtype=np.float32)[None, :, None]
    weights = learner.meta_weights()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=80)
    ax.plot(grid[0, :, 0], amp * np.sin(grid[0, :, 0] - phase), "k-", label="true")
    ax.plot(sx[:, 0], sy[:, 0], "k^", label=f"{shot} support points")
    if hasattr(learner, "predict_distribution"):
        # A black-box learner (CNP): its predicted mean and a +-2 sigma band.
        mu, sigma = (v.numpy()[0, :, 0] for v in learner.predict_distribution(
            weights, sx[None], sy[None], tf.constant(grid)))
        ax.plot(grid[0, :, 0], mu, "b--", label="predicted mean")
        ax.fill_between(grid[0, :, 0], mu - 2 * sigma, mu + 2 * sigma, alpha=0.25,
                        label="+-2 sigma")
    else:
        traj = learner.inner_loop(weights, sx[None], sy[None], max(steps), first_order=True)
        for k in steps:
            pred = learner.net.apply(traj[k], tf.constant(grid))
            ax.plot(grid[0, :, 0], pred[0, :, 0], "--", label=f"after {k} steps")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"sinusoid, {shot}-shot, test task 0")
    return _figure_to_image(fig)


def navigation_image(tasks, trajectories, num_tasks: int = 4, per_task: int = 5) -> tf.Tensor:
    """uint8 ``[1, H, W, 4]``: 2D-navigation paths of the first ``num_tasks`` tasks before
    adaptation (``trajectories[0]``) and after the last inner step (``trajectories[-1]``),
    ``per_task`` episodes each, with the goal marked."""
    tasks = np.asarray(tasks)
    n = min(num_tasks, tasks.shape[0])
    fig, axes = plt.subplots(1, n, figsize=(3 * n, 3.2), dpi=80, squeeze=False)
    shown = [(trajectories[0], "C0", "before adaptation"),
             (trajectories[-1], "C3", f"after {len(trajectories) - 1} steps")]
    for t, ax in enumerate(axes[0]):
        for tr, color, label in shown:
            obs, mask = np.asarray(tr.obs)[t, :, :, :2], np.asarray(tr.mask)[t]
            for i in range(min(per_task, obs.shape[0])):
                path = obs[i][mask[i] > 0]
                ax.plot(path[:, 0], path[:, 1], "-", color=color, alpha=0.6, linewidth=1,
                        label=label if i == 0 else None)
        ax.plot(tasks[t, 0], tasks[t, 1], "k*", markersize=12, label="goal")
        ax.plot(0, 0, "ko", markersize=4)
        ax.set_xlim(-0.6, 0.6)
        ax.set_ylim(-0.6, 0.6)
        ax.set_aspect("equal")
        ax.set_title(f"test task {t}", fontsize=9)
        if t == 0:
            ax.legend(loc="lower left", fontsize=6)
    fig.tight_layout()
    return _figure_to_image(fig)


def learning_curve(steps, means, cis, title: str, ylabel: str, path: str) -> None:
    """Writes a PNG of ``means`` +- ``cis`` against ``steps``."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    means, cis = np.asarray(means), np.asarray(cis)
    # Markers and error bars, so that a curve of a single validation point shows it.
    ax.errorbar(steps, means, yerr=cis, fmt="b-o", markersize=3, capsize=2, elinewidth=0.8)
    if len(steps) > 1:
        ax.fill_between(steps, means - cis, means + cis, alpha=0.3)
    ax.set_xlabel("meta-training iteration")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def last_rise(steps, means, cis, higher_is_better: bool = True):
    """The last step whose value beats the best value before it by more than that best's
    95% CI: where the curve last rose beyond its noise (the first point counts as a rise).
    A long run may stop once this lies far enough behind (``runs/README.md`` takes 10,000
    iterations). ``steps``, ``means``, ``cis``: one entry per validation, in step order."""
    sign = 1.0 if higher_is_better else -1.0
    rise, best, best_ci = None, None, 0.0
    for step, mean, ci in zip(steps, means, cis):
        if best is None or sign * (mean - best) > best_ci:
            rise = step
        if best is None or sign * (mean - best) > 0:
            best, best_ci = mean, ci
    return rise


# The validation value of a history.json point, and whether higher is better.
CURVE_METRICS = (("accuracy", True), ("return", True), ("loss", False))


def curve_metric(point: dict) -> tuple[str, bool]:
    """(key, higher is better) of the validation value in a history.json ``point``: accuracy
    (classification), return (RL) or loss (regression)."""
    for key, higher in CURVE_METRICS:
        if key in point:
            return key, higher
    raise ValueError(f"No validation value in {point}: expected one of "
                     f"{', '.join(k for k, _ in CURVE_METRICS)}.")


def flat_for(history: list[dict]) -> tuple[int | None, int]:
    """(the step of the last rise beyond the 95% CI, ``last_rise``, and the iterations from
    it to the last validation) of a run's validation curve, history.json's points in step
    order; ``(None, 0)`` for an empty curve. ``--stop_when_flat`` ends a run when the second
    reaches it."""
    if not history:
        return None, 0
    key, higher = curve_metric(history[0])
    rise = last_rise([h["step"] for h in history], [h[key] for h in history],
                     [h[f"{key}_ci95"] for h in history], higher_is_better=higher)
    return rise, history[-1]["step"] - (rise or 0)


def _figure_to_image(fig) -> tf.Tensor:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return tf.image.decode_png(buf.getvalue(), channels=4)[None]
