"""Statistics over training runs that differ only by their seed.

A run's ``± 1.96 · std / √tasks`` is the spread over its test tasks, not over training runs:
it cannot say whether two algorithms differ or one was luckier in its initial weights and
task order. Over ``n`` runs of one experiment with seeds ``0..n-1``, ``seed_interval`` gives
the mean of their results and the half-width of its 95% confidence interval from Student's t
distribution with ``n - 1`` degrees of freedom (``t · s / √n``, ``s`` the standard deviation
with ``ddof = 1``), as MAML++ and "A Closer Look at Few-shot Classification" report;
``difference_interval`` says whether two such groups differ by more than their seeds' spread
(Welch's t). ``group_key`` says which runs are such a group.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from maml_tf.config.sections import SECTIONS

# Settings that do not change what a run computes (where it runs, how often it logs, how
# memory is saved): runs that differ only in these and the seed are one experiment.
NOT_THE_EXPERIMENT = ("seed", "log_every", "eval_every", "checkpoint_every", "on_nan",
                      "strategy", "tpu", "jit_compile", "data_dir", "data_source",
                      "inner_recompute", "cpu_devices", "task_chunks", "step_metrics_every")


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), 0 <= x <= 1."""
    if x <= 0.0 or x >= 1.0:
        return max(0.0, min(1.0, x))
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) +
                 a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom, not necessarily whole
    (Welch's), by bisection on ``t_cdf`` to 1e-12."""
    if not 0.0 < p < 1.0 or df < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df >= 1, got p={p}, df={df}.")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    while high - low > 1e-12 * max(1.0, high):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return 0.5 * (low + high)


def seed_interval(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% CI over seeds): ``t_{0.975, n-1} · s / √n`` with ``s``
    the standard deviation (ddof = 1). One value has no interval: NaN."""
    n = len(values)
    if n == 0:
        raise ValueError("seed_interval needs at least one value.")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_quantile(0.975, n - 1) * s / math.sqrt(n)


def difference_interval(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """(mean(a) - mean(b), half-width of its 95% CI, degrees of freedom) by Welch's t: two
    groups of seeds, each with its own variance, ``se = √(s_a²/n_a + s_b²/n_b)``, the
    Welch-Satterthwaite degrees of freedom, half-width ``t_{0.975, df} · se``. A difference
    larger than its half-width is larger than the seeds' spread explains. Each group needs two
    values or more; two groups without spread give half-width 0 (df ``n_a + n_b - 2``)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("difference_interval needs two or more values in each group, got "
                         f"{len(a)} and {len(b)}.")
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    var_a = sum((v - mean_a) ** 2 for v in a) / (len(a) - 1) / len(a)
    var_b = sum((v - mean_b) ** 2 for v in b) / (len(b) - 1) / len(b)
    if var_a + var_b == 0.0:
        return mean_a - mean_b, 0.0, float(len(a) + len(b) - 2)
    df = (var_a + var_b) ** 2 / (var_a ** 2 / (len(a) - 1) + var_b ** 2 / (len(b) - 1))
    return mean_a - mean_b, t_quantile(0.975, df) * math.sqrt(var_a + var_b), df


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value   # config.json writes tuples as lists


# Each setting's default: a run whose config.json predates a setting ran with its default.
_DEFAULTS = {name: section.default(name) for section in SECTIONS for name in section.field_names()}
_ABSENT = object()


def group_key(config: dict) -> tuple:
    """What makes runs one experiment: their flat config without the seed and the settings
    that do not change what is computed (``NOT_THE_EXPERIMENT``). A setting at its default
    counts as absent, so that runs written before a setting existed group with runs that
    leave it at its default."""
    return tuple(sorted((k, repr(_plain(v))) for k, v in config.items()
                        if k not in NOT_THE_EXPERIMENT and _plain(v) != _DEFAULTS.get(k, _ABSENT)))
