"""BOIL (Oh et al. 2021): the inner loop adapts the body and freezes the head."""

from __future__ import annotations

from maml_tf.meta_learner import MetaLearner


class BOIL(MetaLearner):
    """BOIL (Oh et al. 2021): Body Only update in Inner Loop, the mirror of ANIL. The head
    (the last layer with weights, see ``FunctionalModel.split_head``) keeps its meta-weights
    at every inner step; only the body's fast weights move, so adaptation has to reshape the
    features for a fixed classifier. The outer loop meta-learns both, second order through
    the body's inner steps."""

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        body, head = self.net.split_head()
        self.num_body = len(body.variables)
        if self.num_body == 0:
            raise ValueError("BOIL adapts the body, but this model has no weights before its "
                             "head: nothing would adapt.")

    def adapted(self, num_params):
        return [i < self.num_body for i in range(num_params)]
