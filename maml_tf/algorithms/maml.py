"""MAML (Finn et al. 2017) and first-order MAML: the shared core ``MetaLearner`` as it is.

``MAML(model, inner_lr=..., inner_steps=..., first_order=False, loss=...)`` is
``maml_tf.meta_learner.MetaLearner``; ``FOMAML`` fixes ``first_order=True``, which makes the
inner gradients constants for the outer tape (exactly the Hessian term dropped).
"""

from __future__ import annotations

from maml_tf.meta_learner import MetaLearner

MAML = MetaLearner


class FOMAML(MetaLearner):
    """First-order MAML: ``MAML(model, first_order=True, ...)``."""

    def __init__(self, model, **kwargs):
        super().__init__(model, **{**kwargs, "first_order": True})
