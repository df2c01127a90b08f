"""The library calls behind the entry points, each choosing the task family of its config:
``train(config, workdir)`` meta-trains (or resumes) a run and ``evaluate_workdir(workdir)``
evaluates one, both through the one harness (``maml_tf/harness.py``).

The families known by ``--dataset``: reinforcement-learning task distributions go to
``maml_tf.rl.family.RLFamily``, every other data set to
``maml_tf.supervised.SupervisedFamily``. A family of your own needs neither this module nor
the harness changed: pass it to ``maml_tf.harness.train(MyFamily, config, workdir)``.
"""

from __future__ import annotations

import contextlib

from absl import logging

from maml_tf import harness
from maml_tf.config import Config
from maml_tf.data import python_source
from maml_tf.harness import EVAL_OVERRIDES, Run  # noqa: F401 -- part of this API
from maml_tf.rl.family import RLFamily
from maml_tf.supervised import SupervisedFamily


def family_for(config: Config) -> harness.TaskFamily:
    """The task family of ``config.dataset``."""
    return RLFamily(config) if config.is_rl else SupervisedFamily(config)


@contextlib.contextmanager
def _verbosity(verbose: int | None):
    """absl's log level for one call from Python: INFO (the command line's progress lines:
    compile time, tasks/s, ETA, validation) for ``verbose >= 1``, errors only for 0. The
    entry points set their own (--verbosity) and pass None."""
    if verbose is None:
        yield
        return
    previous = logging.get_verbosity()
    logging.set_verbosity(logging.INFO if verbose >= 1 else logging.ERROR)
    try:
        yield
    finally:
        logging.set_verbosity(previous)


def train(config: Config, workdir: str, overwrite: bool = False, model=None, data=None,
          verbose: int | None = 1, callbacks=None) -> dict:
    """Meta-trains (or resumes) the run in ``workdir`` and returns its results (the
    contents of results.json).

    data: your own data set, which then is the run's data (``--dataset=python``):
    ``(images, labels)`` arrays, ``(file paths, labels)``, a ``tf.data.Dataset`` of ``(image,
    label)``, or a dict of such ``{"train", "val", "test"}`` splits (else ``class_split``
    decides them); see ``maml_tf/data/python_source.py``. It is not stored in the workdir:
    pass it again to resume or evaluate (other data is refused by its fingerprint).
    verbose: 1 prints the progress the command line prints (compile time, tasks/s, ETA,
    validations, results), 0 only errors; None leaves absl's log level as it is.
    callbacks: ``keras.callbacks.Callback`` objects (``EarlyStopping(monitor="val_accuracy")``,
    ``CSVLogger``, ``TerminateOnNaN``, your own), called at each logging window and validation
    with TensorBoard's names; see ``maml_tf/callbacks.py``.

    model: None builds ``config.model``. Your own network: a module-level function
    ``(input_shape, num_outputs) -> keras.Model`` (recorded in the workdir, so that resuming
    and ``python -m maml_tf.evaluate`` rebuild it), or a built ``keras.Model`` (default
    strategy only; pass it again to resume). overwrite: move a run with other flags aside
    into ``<workdir>/replaced-<time>/`` instead of refusing.
    """
    config, family = with_data(config, data)
    with _verbosity(verbose):
        return harness.train(family, config, workdir, overwrite=overwrite, model=model,
                             callbacks=callbacks)


def evaluate_workdir(workdir: str, model=None, data=None, verbose: int | None = 1,
                     **overrides) -> dict:
    """Evaluates the latest checkpoint of ``workdir`` on fixed test tasks (as ``python -m
    maml_tf.evaluate``) and writes ``results-<protocol>.json``; see ``harness.evaluate``.
    data: the data set of a run trained on data passed from Python (as for ``train``)."""
    family = family_for
    if data is not None:
        _, family = with_data(harness.read_config(workdir), data)
    with _verbosity(verbose):
        return harness.evaluate(family, workdir, model=model, **overrides)


def with_data(config: Config, data):
    """``(config, family factory)`` of a run given ``data`` from Python: the data set becomes
    ``python``, with the image size and channels the data has (the network is built for
    them)."""
    if data is None:
        return config, family_for
    prepared = python_source.prepare(data, config.image_size, config.channels,
                                     config.label_key, config.strict_data)
    height, _, channels = prepared.classes.image_shape
    config = config.replace(dataset="python", image_size=height, channels=channels)
    return config, lambda c: SupervisedFamily(c, data=prepared)


def build(config: Config, workdir: str, overwrite: bool = False, model=None,
          write_config: bool = True) -> Run:
    """The objects of a run (``harness.build`` with the family of ``config``)."""
    return harness.build(family_for, config, workdir, overwrite=overwrite, model=model,
                         write_config=write_config)


def results_name(config: Config, step: int) -> str:
    """The name of the results file that ``evaluate_workdir`` writes for ``config``."""
    return family_for(config).results_name(config, step)
