"""Runs a ``keras.Model`` as a pure function of weight tensors, for many tasks at once.

MAML needs the model evaluated at *fast weights*: tensors computed from the meta-weights
inside the tape. ``set_weights`` or ``assign`` would cut the second-order path, so the
model is always called functionally here.

``FunctionalModel.apply(params, x)`` takes ``params`` with a leading task axis ``T``
(one list entry per trainable variable, ``[T, *variable.shape]``) and ``x`` of shape
``[T, N, ...]``, and returns ``[T, N, outputs]``.

* A ``keras.Sequential`` built only from ``models.layers`` runs all T tasks together
  (one batched matmul per layer): the fast path.
* Any other ``keras.Model`` runs task by task through Keras 3 ``stateless_call``.
"""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

from maml_tf.models import layers as L


class FunctionalModel:
    """A stateless view of a built ``keras.Model``."""

    def __init__(self, model: keras.Model):
        if not model.built:
            raise ValueError("Build the model (call it once on an example batch) before "
                             "wrapping it in FunctionalModel.")
        self.model = model
        self.batched = isinstance(model, keras.Sequential) and all(
            isinstance(layer, L.TaskBatchedLayer) for layer in model.layers)
        if self.batched:
            self._layers = list(model.layers)
            self.variables = [v for layer in self._layers for v in layer.trainable_variables]
        else:
            self.variables = list(model.trainable_variables)
        self.non_trainable = list(model.non_trainable_variables)
        if not self.variables:
            raise ValueError("The model has no trainable variables to meta-learn.")

    @property
    def names(self) -> list[str]:
        return [v.path for v in self.variables]

    def meta_weights(self) -> list[tf.Tensor]:
        return [v.value for v in self.variables]

    def apply(self, params: Sequence[tf.Tensor], x: tf.Tensor, training: bool = True,
              norm_stats: Sequence | None = None, collect: list | None = None) -> tf.Tensor:
        """params: ``[T, *shape]`` per variable; x: ``[T, N, ...]`` -> ``[T, N, out]``.

        norm_stats: optional ``(mean [C], var [C])`` for each batch-norm layer in order, used
        instead of batch statistics; collect: a list that receives each batch-norm layer's
        batch ``(mean, var)``. Both need the fast path.
        """
        if self.batched:
            return _apply_layers(self._layers, params, x, training, norm_stats, collect)
        if norm_stats is not None or collect is not None:
            self._require_batched("norm_stats / collect")
        outs = []
        for t in range(x.shape[0]):
            y, _ = self.model.stateless_call([p[t] for p in params],
                                             [v.value for v in self.non_trainable],
                                             x[t], training=training)
            outs.append(y)
        return tf.stack(outs)


    # -- views used by algorithms that treat the last layer apart (ANIL, ProtoNets) -------
    def _require_batched(self, what: str) -> None:
        if not self.batched:
            raise ValueError(f"{what} needs a keras.Sequential of models.layers layers; got "
                             f"{type(self.model).__name__}.")

    def param_layers(self) -> list:
        """The layer that owns each entry of ``variables`` (same order)."""
        self._require_batched("param_layers")
        return [layer for layer in self._layers for _ in layer.trainable_variables]

    def batch_norm_channels(self) -> list[int]:
        """Channels of each ``BatchNorm`` layer, in order (for per-layer running statistics)."""
        self._require_batched("batch_norm_channels")
        return [int(layer.gamma.shape[0]) for layer in self._layers if isinstance(layer, L.BatchNorm)]

    def split_head(self) -> tuple["LayerStack", "LayerStack"]:
        """(body, head): the head is the last layer with weights (the classifier), the
        body everything before it. ``body.apply`` maps ``[T, N, ...]`` to features
        ``[T, N, D]``; ``head.apply`` maps features to outputs."""
        self._require_batched("split_head")
        last = max(i for i, layer in enumerate(self._layers) if layer.trainable_variables)
        return LayerStack(self._layers[:last]), LayerStack(self._layers[last:])


class LayerStack:
    """A slice of a ``FunctionalModel``'s layers with the same ``apply`` interface."""

    def __init__(self, layers: list):
        self._layers = layers
        self.variables = [v for layer in layers for v in layer.trainable_variables]

    def meta_weights(self) -> list[tf.Tensor]:
        return [v.value for v in self.variables]

    def apply(self, params: Sequence[tf.Tensor], x: tf.Tensor, training: bool = True) -> tf.Tensor:
        return _apply_layers(self._layers, params, x, training)


def _apply_layers(layers, params, x, training, norm_stats=None, collect=None):
    i, j = 0, 0
    for layer in layers:
        n = len(layer.trainable_variables)
        if isinstance(layer, L.BatchNorm) and (norm_stats is not None or collect is not None):
            stats = norm_stats[j] if norm_stats is not None else None
            x = layer.batched_apply(list(params[i:i + n]), x, training, stats, collect)
            j += 1
        else:
            x = layer.batched_apply(list(params[i:i + n]), x, training)
        i += n
    return x


def tile_for_tasks(weights: Sequence[tf.Tensor], num_tasks: int) -> list[tf.Tensor]:
    """Meta-weights ``[*shape]`` -> per-task copies ``[T, *shape]`` (gradient sums over T)."""
    return [tf.broadcast_to(w, [num_tasks] + w.shape.as_list()) for w in weights]
