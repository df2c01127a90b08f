"""Meta-SGD (Li et al. 2017): a learned inner step size for every parameter."""

from __future__ import annotations

import tensorflow as tf

from maml_tf.algorithms._util import safe_name
from maml_tf.meta_learner import MetaLearner


class MetaSGD(MetaLearner):
    """Meta-SGD (Li et al. 2017): every parameter has its own inner step size (a tensor of
    its shape), initialised to ``inner_lr`` and meta-trained with the weights."""

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self.extra = [tf.Variable(tf.fill(v.shape, tf.constant(self.inner_lr, v.dtype)),
                                  name=f"lr_{safe_name(v.path)}") for v in self.net.variables]

    def inner_lr_for(self, index, step, extra, dtype):
        return extra[index]

    def write_summaries(self, step):
        for v, lr in zip(self.net.variables, self.extra):
            tf.summary.histogram(f"metasgd_lr/{safe_name(v.path)}", lr, step=step)
            tf.summary.scalar(f"metasgd_lr_mean/{safe_name(v.path)}", tf.reduce_mean(lr), step=step)
