"""maml_tf: gradient-based meta-learning (MAML and friends) in TensorFlow 2 / Keras 3.

The public API, the same objects that ``python -m maml_tf.train`` builds::

    import maml_tf
    learner = maml_tf.MAML(model, inner_lr=0.4, inner_steps=1)     # any built keras.Model
    loss, grads = learner.meta_gradient(episode)                   # a maml_tf.Episode
    optimizer.apply(grads, learner.meta_variables)

    maml_tf.train(maml_tf.Config(dataset="omniglot", ...), workdir, model=my_model_fn)
    learner = maml_tf.load(workdir)                                # the trained learner
    maml_tf.export(workdir, "saved_model", "served/")              # adapt_and_predict, TF only

Learners (all ``MetaLearner``s: see its docstring for the shared arguments):
optimization-based ``MAML``, ``FOMAML``, ``Reptile``, ``MetaSGD``, ``ANIL``, ``BOIL``,
``CAVIA``, ``IMAML``, ``MAMLPlusPlus``; metric-based ``ProtoNet``, ``R2D2``, ``MetaOptNet``,
``MatchingNet``, ``RelationNet``; black-box ``MANN``, ``SNAIL``, ``CNP`` (regression) and
``CNPClassifier`` (images); and the ``Pretrain`` baseline.
Reinforcement learning (Gaussian policies, rollouts, TRPO) on the same learners lives in
``maml_tf.rl``.
"""

import os as _os

# Before Keras or matplotlib is imported: their configuration and caches go to one documented
# folder (MAML_TF_CACHE, default ~/.cache/maml_tf) instead of ~/.keras and ~/.config; a
# variable that the user set wins. (A program that imports keras before maml_tf keeps Keras'
# own default, ~/.keras/keras.json.)
_CACHE = _os.environ.get("MAML_TF_CACHE") or _os.path.join(
    _os.environ.get("XDG_CACHE_HOME") or _os.path.join(_os.path.expanduser("~"), ".cache"),
    "maml_tf")
_os.environ.setdefault("KERAS_HOME", _os.path.join(_CACHE, "keras"))
_os.environ.setdefault("MPLCONFIGDIR", _os.path.join(_CACHE, "matplotlib"))


def _import_tensorflow_once() -> None:
    """Imports TensorFlow, showing its start-up notices once: TF 2.21's two native libraries
    each print them ("All log messages before absl::InitializeLog() ...", "oneDNN custom
    operations are on ..."). Its stderr goes to a file meanwhile; every other line is
    passed on unchanged."""
    import re
    import sys
    import tempfile
    if "tensorflow" in sys.modules:
        return
    try:
        sys.stderr.flush()
        fd = sys.stderr.fileno()
        saved = _os.dup(fd)
    except (AttributeError, OSError, ValueError):   # no real stderr (a notebook): as it is
        import tensorflow  # noqa: F401
        return
    with tempfile.TemporaryFile() as caught:
        _os.dup2(caught.fileno(), fd)
        try:
            import tensorflow  # noqa: F401,F811
        finally:
            _os.dup2(saved, fd)
            _os.close(saved)
            caught.seek(0)
            seen = set()
            for line in caught.read().decode(errors="replace").splitlines(keepends=True):
                # The same notice differs only in its time stamp and thread id.
                key = re.sub(r"^[IWEF]\d{4} [\d:.]+\s+\d+ ", "", line)
                if key not in seen:
                    seen.add(key)
                    sys.stderr.write(line)
            sys.stderr.flush()


_import_tensorflow_once()

from maml_tf.config import Config, ConfigError  # noqa: E402
from maml_tf.data.episode import Episode  # noqa: E402
from maml_tf.algorithms import (ANIL, BOIL, CAVIA, CNP, FOMAML, IMAML, MAML, MANN,  # noqa: E402
                                CNPClassifier,
                                MamlPlusPlus, MatchingNet, MetaOptNet, MetaSGD, Pretrain,
                                ProtoNet, R2D2, RelationNet, Reptile, SNAIL,
                                build_learner)
from maml_tf.meta_learner import MetaLearner, StepMetrics  # noqa: E402
from maml_tf.models.functional import FunctionalModel, InexactModelError  # noqa: E402
from maml_tf.api import evaluate_workdir, train  # noqa: E402
from maml_tf.serving import export, load  # noqa: E402
from maml_tf.version import VERSION  # noqa: E402

__version__ = VERSION
MAMLPlusPlus = MamlPlusPlus

__all__ = ["ANIL", "BOIL", "CAVIA", "CNP", "CNPClassifier", "Config", "ConfigError", "Episode", "FOMAML",
           "FunctionalModel", "IMAML", "InexactModelError", "MAML", "MAMLPlusPlus", "MANN",
           "MatchingNet", "MetaLearner", "MetaOptNet", "MetaSGD", "Pretrain", "ProtoNet", "R2D2",
           "RelationNet", "Reptile", "SNAIL", "StepMetrics", "build_learner", "evaluate_workdir", "export",
           "load", "train"]
