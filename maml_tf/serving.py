"""A meta-trained model out of its workdir: ``load`` it as a learner, ``export`` it as a
``.keras`` file (the meta-initialisation) or as a SavedModel that adapts and predicts.

* ``load(workdir)``: the run's learner (any algorithm, any network) with a checkpoint's
  weights, ready for ``adapt`` / ``predict`` / ``predict_queries`` / ``evaluate``. Reading
  never changes the workdir, so a run may be loaded while it trains.
* ``export_keras``: the network at its meta-learned weights as plain Keras layers, which
  ``keras.models.load_model`` opens without maml_tf: the weights to fine-tune from.
* ``export_saved_model``: a SavedModel whose ``adapt_and_predict(support_x, support_y,
  query_x)`` runs the learner's own test-time adaptation (the run's evaluation: inner steps
  and step sizes, ``--eval_mode``; the support-set read-out of the embedding and black-box
  learners) inside the graph; it needs only TensorFlow to load and to serve.
"""

from __future__ import annotations

import dataclasses
import os

import keras
import tensorflow as tf
from absl import logging

from maml_tf import api, checkpointing, harness
from maml_tf.config import Config, ConfigError
from maml_tf.data.episode import Episode
from maml_tf.meta_learner import MetaLearner
from maml_tf.models import layers as L

FORMATS = ("keras", "saved_model")


@dataclasses.dataclass
class Loaded:
    """What ``load`` read: the learner, the run's config and the checkpoint's step."""
    learner: MetaLearner
    config: Config
    step: int


def load(workdir: str, checkpoint: int | None = None, model=None, data=None) -> MetaLearner:
    """The learner of the run in ``workdir`` at checkpoint ``ckpt-<checkpoint>`` (default:
    the newest that loads; a damaged one is skipped with a warning, and left where it is).

    ``learner.model`` is the Keras network holding the meta-weights; ``learner.config`` the
    run's ``Config`` and ``learner.checkpoint_step`` the step read. model / data: as for
    ``maml_tf.train`` when the run was given a ``keras.Model`` object or data from Python.
    """
    loaded = load_run(workdir, checkpoint, model, data)
    loaded.learner.config = loaded.config
    loaded.learner.checkpoint_step = loaded.step
    return loaded.learner


def load_run(workdir: str, checkpoint: int | None = None, model=None, data=None) -> Loaded:
    """``load``, returning the learner, config and step separately."""
    if not os.path.exists(os.path.join(workdir, "config.json")):
        raise ConfigError(f"{workdir} holds no run (no config.json): name the --workdir that "
                          "maml_tf.train wrote.")
    # One process, one device: how the run was distributed does not matter for its weights;
    # task_chunks only splits meta-training batches.
    config = harness.read_config(workdir).replace(strategy="default", cpu_devices=0,
                                                  task_chunks=1)
    config, family = api.with_data(config, data)
    r = harness.build(family, config, workdir, model=model, write_config=False,
                      read_only=True)
    step = checkpointing.restore_for_reading(r.checkpoint, os.path.join(workdir, "checkpoints"),
                                             checkpoint)
    logging.info("Loaded checkpoint ckpt-%d of %s (%s).", step, workdir, config.algorithm)
    return Loaded(r.learner, r.config, step)


# -- .keras: the meta-initialisation ---------------------------------------------------


def plain_keras(model: keras.Model) -> keras.Model:
    """``model`` made of standard Keras layers only, with the same weights and outputs.

    The zoo's task-batched layers (``models.layers``) become their Keras counterparts; their
    batch norm, which has no running statistics, becomes ``BatchNormalization`` called with
    ``training=True``, so that calling the model (and ``fit``) normalises with the batch's
    statistics as MAML does. A model without them is returned as it is.
    """
    if not any(isinstance(layer, L.TaskBatchedLayer) for layer in model.layers):
        return model
    if not isinstance(model, keras.Sequential):
        raise ConfigError("Only a keras.Sequential of maml_tf's task-batched layers can be turned "
                          "into standard Keras layers; build your network from keras.layers.")
    x = inputs = keras.Input(model.input_shape[1:], dtype=model.inputs[0].dtype)
    for layer in model.layers:
        x = _standard(layer, x)
    return keras.Model(inputs, x, name=model.name)


def _standard(layer, x):
    """``x`` through the standard Keras layer equal to the task-batched ``layer``, its
    weights copied."""
    common = dict(name=layer.name, dtype=layer.dtype_policy)
    kind = type(layer)
    if kind is L.Conv2D:
        new = keras.layers.Conv2D(layer.filters, layer.kernel_size, layer.strides, padding="same",
                                  use_bias=layer.use_bias, **common)
    elif kind is L.Dense:
        new = keras.layers.Dense(layer.units, use_bias=layer.use_bias, **common)
    elif kind is L.BatchNorm:
        new = keras.layers.BatchNormalization(epsilon=layer.epsilon, **common)
        y = new(x, training=True)
        new.set_weights([w.numpy() for w in layer.weights] + new.get_weights()[2:])
        return y
    elif kind is L.LayerNorm:
        new = keras.layers.LayerNormalization(axis=list(range(1, len(x.shape))),
                                              epsilon=layer.epsilon, **common)
        y = new(x)
        # LayerNorm's scale and offset are per channel; Keras' over every normalised axis.
        shape = new.get_weights()[0].shape
        new.set_weights([tf.broadcast_to(w, shape).numpy() for w in layer.weights])
        return y
    elif kind is L.ReLU:
        new = keras.layers.ReLU(**common)
    elif kind is L.MaxPool2x2:
        new = keras.layers.MaxPooling2D(2, 2, padding="valid", **common)
    elif kind is L.GlobalAvgPool:
        new = keras.layers.GlobalAveragePooling2D(**common)
    elif kind is L.Flatten:
        new = keras.layers.Flatten(**common)
    elif isinstance(layer, L.TaskBatchedLayer):
        raise ConfigError(f"Layer {layer.name!r} ({kind.__name__}) has no standard Keras "
                          "counterpart to export.")
    else:
        return layer(x)
    y = new(x)
    new.set_weights([w.numpy() for w in layer.weights])
    return y


def export_keras(learner: MetaLearner, path: str) -> str:
    """Writes the network at its meta-learned weights to ``path`` (``.keras``), in standard
    Keras layers (``plain_keras``). The algorithm's own learned tensors (Meta-SGD's step
    sizes, a relation module, SNAIL's or MANN's read-out) are not part of it: export a
    SavedModel to adapt and predict with them."""
    if not path.endswith(".keras"):
        raise ConfigError(f"--out={path}: a Keras model file must end in .keras.")
    plain_keras(learner.model).save(path)
    return path


# -- SavedModel: adapt and predict -----------------------------------------------------


class AdaptAndPredict(tf.Module):
    """The learner's test-time adaptation as a TensorFlow function with fixed shapes.

    ``adapt_and_predict(support_x [T, way*shot, *x], support_y [T, way*shot] int32 (or
    ``[T, K, 1]`` float32 for regression), query_x [T, N_q, *x])`` -> ``{"logits"
    [T, N_q, way], "probabilities" [T, N_q, way]}`` (regression: ``{"predictions"}``), for any
    number of tasks T; ``adapt_and_predict_task`` is the same for one task, without the task
    axis. Images are float32 in [0, 1], preprocessed as the run's data.
    """

    def __init__(self, learner: MetaLearner, config: Config, shot: int, queries: int,
                 mode: str, steps: int):
        super().__init__()
        self.learner = learner
        # Tracked here so that the SavedModel holds every tensor the functions read, as the
        # tf.Variables under Keras' variables: a session-based server (TF Serving,
        # saved_model_cli) finds only variables saved as such.
        self.weights = [getattr(v, "value", v) for v in
                        list(learner.meta_variables) + list(learner.state)]
        self._steps, self._mode = steps, mode
        regression = config.is_regression
        x_shape = [1] if regression else list(config.image_shape)
        n_s = shot if regression else config.way * shot
        n_q = queries if regression else config.way * queries
        y_spec = (tf.TensorSpec([None, n_s, 1], tf.float32, "support_y") if regression
                  else tf.TensorSpec([None, n_s], tf.int32, "support_y"))
        specs = [tf.TensorSpec([None, n_s, *x_shape], tf.float32, "support_x"), y_spec,
                 tf.TensorSpec([None, n_q, *x_shape], tf.float32, "query_x")]
        self._regression = regression
        self.adapt_and_predict = tf.function(self._tasks, input_signature=specs)
        self.adapt_and_predict_task = tf.function(
            self._task, input_signature=[tf.TensorSpec(s.shape[1:], s.dtype, s.name) for s in specs])

    def _one(self, args):
        sx, sy, qx = args
        episode = Episode(sx[None], sy[None], qx[None], None)
        return self.learner.predict_queries(episode, self._steps, self._mode)[0]

    def _outputs(self, out: tf.Tensor) -> dict:
        if self._regression:
            return {"predictions": out}
        return {"logits": out, "probabilities": tf.nn.softmax(out)}

    def _tasks(self, support_x, support_y, query_x):
        # One task at a time: the learner's shapes are static, and tasks are independent.
        out = tf.map_fn(self._one, (support_x, support_y, query_x),
                        fn_output_signature=tf.float32)
        return self._outputs(out)

    def _task(self, support_x, support_y, query_x):
        return self._outputs(self._one((support_x, support_y, query_x)))


def export_saved_model(learner: MetaLearner, config: Config, path: str,
                       shot: int | None = None, queries: int | None = None,
                       mode: str | None = None, steps: int | None = None) -> str:
    """Writes a SavedModel of ``AdaptAndPredict`` to ``path`` (a new or empty folder).

    shot / queries: the support examples and queries per class of the served tasks (points
    per task for regression); default the run's shot and evaluation queries. mode and steps:
    the run's ``--eval_mode`` and evaluation inner steps by default. The serving signature
    (``serving_default``) is ``adapt_and_predict``.
    """
    if config.is_rl:
        raise ConfigError("A reinforcement-learning run adapts by rollouts in its environment, "
                          "which a SavedModel cannot run: use maml_tf.load(workdir) and "
                          "maml_tf.rl, or export the policy network with --format=keras.")
    if os.path.isdir(path) and os.listdir(path):
        raise ConfigError(f"--out={path} exists and is not empty: name a new folder (a "
                          "SavedModel is never written over another).")
    module = AdaptAndPredict(learner, config, shot or config.shot, queries or config.test_queries,
                             mode or config.eval_mode,
                             config.test_inner_steps if steps is None else steps)
    tf.saved_model.save(module, path, signatures={
        "serving_default": module.adapt_and_predict,
        "adapt_and_predict": module.adapt_and_predict,
        "adapt_and_predict_task": module.adapt_and_predict_task})
    return path


def export(workdir: str, format: str, out: str, checkpoint: int | None = None, model=None,
           data=None, **saved_model_options) -> str:
    """Loads the run in ``workdir`` and exports it as ``format`` (``FORMATS``) to ``out``;
    ``saved_model_options``: ``shot``, ``queries``, ``mode``, ``steps`` (see
    ``export_saved_model``)."""
    if format not in FORMATS:
        raise ConfigError(f"--format={format}: choose one of {', '.join(FORMATS)}.")
    loaded = load_run(workdir, checkpoint, model, data)
    if format == "keras":
        path = export_keras(loaded.learner, out)
    else:
        path = export_saved_model(loaded.learner, loaded.config, out, **saved_model_options)
    logging.info("Exported ckpt-%d of %s as %s to %s", loaded.step, workdir, format, path)
    return path
