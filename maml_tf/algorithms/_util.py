"""Helpers shared by the algorithms' TensorBoard summaries."""

from __future__ import annotations

import tensorflow as tf


def scalar_summaries(prefix: str, values: dict, step: int) -> None:
    for name, value in values.items():
        tf.summary.scalar(f"{prefix}/{name}", value, step=step)


def safe_name(name: str) -> str:
    return name.replace("/", "_")
