"""The meta-learning algorithms, one module each, all subclasses of ``MetaLearner``, and
``build_learner(config, model)`` that ``--algorithm`` names.

==========  ==========================================================================
maml       ``MAML`` (``maml.py``, the core ``MetaLearner``): second-order MAML (Finn et al. 2017)
fomaml     ``FOMAML`` (``maml.py``): the second-order term dropped
reptile    ``Reptile`` (Nichol et al. 2018): pseudo-gradient towards adapted weights
metasgd    ``MetaSGD`` (Li et al. 2017): a learned step size for every parameter
anil       ``ANIL`` (Raghu et al. 2020): the inner loop adapts the head only
boil       ``BOIL`` (Oh et al. 2021): the inner loop adapts the body only
cavia      ``CAVIA`` (Zintgraf et al. 2019): a per-task context vector adapts, weights do not
imaml      ``IMAML`` (Rajeswaran et al. 2019): proximal inner loop, implicit meta-gradient (CG)
mamlpp     ``MamlPlusPlus`` (Antoniou et al. 2019): LSLR, BNWB, BNRS, MSL, DA (+ CA: a schedule)
protonet   ``ProtoNet`` (Snell et al. 2017): nearest class mean of Conv-4 embeddings
r2d2       ``R2D2`` (Bertinetto et al. 2019): closed-form ridge-regression head
metaoptnet ``MetaOptNet`` (Lee et al. 2019): multi-class SVM head, implicit differentiation
matching   ``MatchingNet`` (Vinyals et al. 2016): cosine attention, optional FCE LSTMs
relation   ``RelationNet`` (Sung et al. 2018): a learned relation module on feature maps
mann       ``MANN`` (Santoro et al. 2016): black box, LSTM controller + LRU-access memory
snail      ``SNAIL`` (Mishra et al. 2018): black box, temporal convolutions + causal attention
cnp        ``CNP`` (Garnelo et al. 2018): black box, mean-aggregated encoder, Gaussian decoder;
           ``CNPClassifier`` on images: class-wise mean codes, a decoder scoring each class
pretrain   ``Pretrain``: one network trained on all training classes, fine-tuned at test
==========  ==========================================================================
"""

from __future__ import annotations

import keras

from maml_tf.algorithms.anil import ANIL
from maml_tf.algorithms.boil import BOIL
from maml_tf.algorithms.cavia import CAVIA
from maml_tf.algorithms.cnp import CNP, CNPClassifier
from maml_tf.algorithms.imaml import IMAML
from maml_tf.algorithms.maml import FOMAML, MAML
from maml_tf.algorithms.mann import MANN
from maml_tf.algorithms.mamlpp import MamlPlusPlus
from maml_tf.algorithms.matching import MatchingNet
from maml_tf.algorithms.metaoptnet import MetaOptNet
from maml_tf.algorithms.metasgd import MetaSGD
from maml_tf.algorithms.pretrain import Pretrain
from maml_tf.algorithms.protonet import ProtoNet
from maml_tf.algorithms.r2d2 import R2D2
from maml_tf.algorithms.relation import RelationNet
from maml_tf.algorithms.reptile import Reptile
from maml_tf.algorithms.snail import SNAIL
from maml_tf.meta_learner import MetaLearner

__all__ = ["ANIL", "BOIL", "CAVIA", "CNP", "CNPClassifier", "FOMAML", "IMAML", "MAML", "MANN",
           "MamlPlusPlus", "MatchingNet",
           "MetaOptNet", "MetaSGD", "Pretrain", "ProtoNet", "R2D2", "RelationNet", "Reptile",
           "SNAIL", "build_learner", "train_inner_steps"]


def build_learner(config, model: keras.Model, num_classes: int | None = None,
                  loss=None, metric: str | None = "default") -> MetaLearner:
    """The learner of ``config.algorithm`` around ``model``.

    num_classes: training classes for the pre-training baseline on images (None reads the
    training split's class count). loss, metric: the task family's (reinforcement learning
    passes its policy-gradient surrogate and no metric); by default mean squared error for
    regression, cross-entropy and accuracy for classification.
    """
    if loss is None:
        loss = "mse" if config.is_regression else "cross_entropy"
    if metric == "default":
        metric = None if config.is_regression else "accuracy"
    kwargs = dict(inner_lr=config.inner_lr, inner_steps=config.inner_steps,
                  first_order=config.first_order, loss=loss, metric=metric,
                  recompute=config.inner_recompute,
                  compute_dtype=None if config.precision == "float32" else config.precision,
                  inner_optimizer=config.inner_optimizer, allow_inexact=config.allow_inexact)
    algorithm = config.algorithm
    if algorithm in ("maml", "fomaml"):
        return MetaLearner(model, **kwargs)
    if algorithm == "mamlpp":
        return MamlPlusPlus(model, lslr=config.lslr, bnwb=config.bnwb, bnrs=config.bnrs,
                            msl_iterations=config.msl_iterations,
                            da_iterations=config.da_iterations, **kwargs)
    if algorithm == "cavia":
        return CAVIA(model, context_dim=config.context_dim,
                     film_layer=config.film_layer or None, **kwargs)
    if algorithm == "imaml":
        return IMAML(model, lam=config.imaml_lambda, cg_steps=config.cg_steps,
                     cg_damping=config.cg_damping, lam_damping=config.imaml_lambda_damping,
                     **kwargs)
    if algorithm == "cnp" and config.is_regression:
        return CNP(model, **kwargs)
    if algorithm == "cnp":
        return CNPClassifier(model, way=config.way, **kwargs)
    if algorithm == "mann":
        return MANN(model, way=config.way, write=config.mann_write, **kwargs)
    if algorithm == "snail":
        return SNAIL(model, way=config.way, shot=config.shot, **kwargs)
    if algorithm == "protonet":
        return ProtoNet(model, way=config.way, **kwargs)
    if algorithm == "r2d2":
        return R2D2(model, way=config.way, **kwargs)
    if algorithm == "metaoptnet":
        return MetaOptNet(model, way=config.way, svm_c=config.svm_c,
                          svm_iterations=config.svm_iterations, **kwargs)
    if algorithm == "matching":
        return MatchingNet(model, way=config.way, fce=config.fce, fce_steps=config.fce_steps,
                           **kwargs)
    if algorithm == "relation":
        return RelationNet(model, way=config.way, hidden=config.relation_hidden, **kwargs)
    if algorithm == "pretrain" and config.is_rl:
        # A policy trained on all tasks jointly (no inner step in meta-training), then
        # fine-tuned at test by the same policy-gradient inner steps.
        return MetaLearner(model, **kwargs)
    if algorithm == "pretrain":
        if not config.is_regression and num_classes is None:
            from maml_tf import data as data_lib
            num_classes = int(data_lib.split_images(config, "train").shape[0])
        return Pretrain(model, num_classes=None if config.is_regression else num_classes,
                        **kwargs)
    return {"reptile": Reptile, "metasgd": MetaSGD, "anil": ANIL,
            "boil": BOIL}[algorithm](model, **kwargs)


def train_inner_steps(config) -> int:
    """Inner steps during meta-training: none for the pre-training baseline (it trains one
    network on all tasks jointly and is fine-tuned only at evaluation) or the embedding
    learners (ProtoNets, R2-D2, MetaOptNet, Matching and Relation Networks) or the black-box
    ones (MANN, SNAIL, CNP)."""
    if config.algorithm == "pretrain" or not config.has_inner_loop:
        return 0
    return config.inner_steps
