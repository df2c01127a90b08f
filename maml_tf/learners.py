"""``build_learner(config, model)``: the meta-learner that ``--algorithm`` names."""

from __future__ import annotations

import keras

from maml_tf import losses
from maml_tf.meta_learner import MetaLearner
from models.functional import FunctionalModel


def build_learner(config, model: keras.Model) -> MetaLearner:
    loss_fn, metric_fn = losses.LOSSES["regression" if config.is_regression else "classification"]
    return MetaLearner(FunctionalModel(model), loss_fn, metric_fn, config.inner_lr,
                       first_order=config.first_order, recompute=config.inner_recompute,
                       compute_dtype=None if config.precision == "float32" else config.precision)


def train_inner_steps(config) -> int:
    """Inner steps during meta-training. The pre-training baseline trains one network on
    all tasks jointly (no inner loop) and is fine-tuned only at evaluation."""
    return 0 if config.algorithm == "pretrain" else config.inner_steps
