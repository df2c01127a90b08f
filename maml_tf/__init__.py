"""maml_tf: gradient-based meta-learning (MAML and friends) in TensorFlow 2 / Keras 3.

The public API, the same objects that ``python -m maml_tf.train`` builds::

    import maml_tf
    learner = maml_tf.MAML(model, inner_lr=0.4, inner_steps=1)     # any built keras.Model
    loss, grads = learner.meta_gradient(episode)                   # a maml_tf.Episode
    optimizer.apply(grads, learner.meta_variables)

    maml_tf.train(maml_tf.Config(dataset="omniglot", ...), workdir, model=my_model_fn)

Learners: ``MAML``, ``FOMAML``, ``Reptile``, ``MetaSGD``, ``ANIL``, ``MAMLPlusPlus``,
``ProtoNet``, ``Pretrain`` (all ``MetaLearner``s: see its docstring for the arguments).
"""

from maml_tf.config import Config, ConfigError
from maml_tf.data.episode import Episode
from maml_tf.learners import (ANIL, MamlPlusPlus, MetaSGD, Pretrain, ProtoNet, Reptile,
                              build_learner)
from maml_tf.meta_learner import MetaLearner, StepMetrics
from maml_tf.models.functional import FunctionalModel, InexactModelError
from maml_tf.train_loop import evaluate_workdir
from maml_tf.train_loop import run as train

__version__ = "0.1.0"

MAML = MetaLearner
MAMLPlusPlus = MamlPlusPlus


class FOMAML(MetaLearner):
    """First-order MAML: ``MAML(model, first_order=True, ...)``."""

    def __init__(self, model, **kwargs):
        super().__init__(model, **{**kwargs, "first_order": True})


__all__ = ["ANIL", "Config", "ConfigError", "Episode", "FOMAML", "FunctionalModel",
           "InexactModelError", "MAML", "MAMLPlusPlus", "MetaLearner", "MetaSGD", "Pretrain",
           "ProtoNet", "Reptile", "StepMetrics", "build_learner", "evaluate_workdir", "train"]
