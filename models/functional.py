"""Runs any built ``keras.Model`` as a pure function of weight tensors, for many tasks at once.

MAML needs the model evaluated at *fast weights*: tensors computed from the meta-weights
inside the tape. ``set_weights`` or ``assign`` would cut the second-order path, so the
model is always called functionally here.

``FunctionalModel.apply(params, x)`` takes ``params`` with a leading task axis ``T``
(one entry per variable of ``FunctionalModel.variables``, i.e. ``model.trainable_variables``,
each ``[T, *variable.shape]``) and ``x`` of shape ``[T, N, ...]``, and returns
``[T, N, ...outputs]``.

How a model is run: its layer graph is walked (a ``Sequential``'s layers in order; a
Functional model's nodes; a subclassed model's ``call`` traced once on a symbolic input,
which records the layers and ``keras.ops`` it uses), and every node runs for all T tasks
together:

* ``models.layers`` (the zoo's layers): their own ``batched_apply``;
* standard ``keras.layers`` (Dense, Conv2D, BatchNormalization, pooling, ...): the exact
  task-batched math of ``models.keras_layers``;
* elementwise ``keras.ops`` (``x + y``, ``keras.ops.relu``): called as they are;
* anything else: the layer's own ``stateless_call``, task by task. Its second derivative
  is not known to be exact, so a second-order learner refuses such a model
  (``InexactModelError``) unless told to accept it (``strict=False``: a warning).

Why this module is long: the three ways of walking a model (Sequential, Functional graph,
traced subclass) share one runner and one exactness check, which would otherwise be
stated three times.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import types
import warnings
from typing import Sequence

import keras
import tensorflow as tf

from maml_tf.models import keras_layers as KL
from maml_tf.models import layers as L
from maml_tf.models import mixed

# The mode models run in: training (dropout on) unless inside ``inference()``. Read while
# a tf.function traces, so the evaluation step traces with dropout off.
_MODE = types.SimpleNamespace(training=True)


# Batch-norm statistics that forward passes use or collect when not given explicitly: the
# ``support`` evaluation mode collects them from each task's support set and normalises its
# queries with them, through any learner's forward pass (``norm_statistics``).
_NORM = types.SimpleNamespace(stats=None, collect=None)


@contextlib.contextmanager
def norm_statistics(stats=None, collect=None):
    """Within this context, forward passes that are not given ``norm_stats`` / ``collect``
    use ``stats`` (per batch-norm call, ``(mean, var)`` each ``[C]`` or ``[T, C]``) instead of
    batch statistics, or append each batch norm's statistics to ``collect``."""
    previous = (_NORM.stats, _NORM.collect)
    _NORM.stats, _NORM.collect = stats, collect
    try:
        yield
    finally:
        _NORM.stats, _NORM.collect = previous


def with_support_statistics(support_fn, query_fn):
    """(support_fn(), query_fn()), the second run with batch norm using, per task, the
    statistics that the first one's batch norms saw (the ``support`` evaluation mode)."""
    from maml_tf.models.layers import PerTaskStats
    stats = PerTaskStats()
    with norm_statistics(collect=stats):
        support = support_fn()
    with norm_statistics(stats=list(stats)):
        return support, query_fn()


@contextlib.contextmanager
def inference():
    """Within this context models run with ``training=False``: dropout is off. (Batch
    normalisation still uses each task's batch statistics, see ``models.keras_layers``.)"""
    previous, _MODE.training = _MODE.training, False
    try:
        yield
    finally:
        _MODE.training = previous


class InexactModelError(ValueError):
    """The model holds a layer whose second derivative maml_tf cannot guarantee."""


def _functional_class():
    from keras.src.models.functional import Functional
    return Functional


def _root_of(model: keras.Model):
    """``("chain", layers)`` for a Sequential, ``("graph", functional)`` for a Functional
    model or a traced subclassed one; raises ``TypeError`` (saying why) if neither works."""
    if isinstance(model, keras.Sequential):
        return "chain", list(model.layers)
    if isinstance(model, _functional_class()):
        return "graph", model
    return "graph", _trace(model)


def _trace(model: keras.Model):
    """A Functional view of a subclassed model: its ``call`` run once on a symbolic input
    records every layer call and ``keras.ops`` op as a graph node (the layers and their
    variables are the model's own)."""
    shapes = getattr(model, "_build_shapes_dict", None) or {}
    if len(shapes) != 1:
        raise TypeError("its input shape is unknown: build it by calling it once on a batch "
                        "of examples (one input tensor)")
    shape = tuple(list(shapes.values())[0])[1:]
    inputs = keras.Input(shape=shape, dtype=model.compute_dtype)
    kwargs = {"training": True} if "training" in inspect.signature(model.call).parameters else {}
    try:
        outputs = model.call(inputs, **kwargs)
        return keras.Model(inputs, outputs)
    except Exception as e:   # noqa: BLE001 -- any failure means: not traceable
        raise TypeError(f"its call() could not be traced on a symbolic input ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); write it with keras "
                        "layers and keras.ops, without Python branches on tensor values") from e


def _ops(root) -> list:
    """Every operation of a root in execution order, nested models expanded."""
    kind, obj = root
    if kind == "chain":
        ops = obj
    else:
        ops = [node.operation for depth in sorted(obj._nodes_by_depth, reverse=True)
               for node in obj._nodes_by_depth[depth] if node.operation and not node.is_input]
    out = []
    for op in ops:
        if isinstance(op, keras.Model):
            out.extend(_ops(_root_of(op)))
        else:
            out.append(op)
    return out


def _weights(op) -> list:
    """A layer's weights; none for a ``keras.ops`` operation."""
    return list(getattr(op, "weights", []))


def _unsupported_reason(op) -> str | None:
    """Why ``op`` has no exact task-batched implementation here, or None if it has one."""
    if isinstance(op, (L.TaskBatchedLayer, keras.layers.InputLayer)):
        return None
    entry = KL.SUPPORTED.get(type(op))
    if entry is not None:
        return entry[0](op)
    if isinstance(op, KL.ELEMENTWISE_OPS):
        return None
    return "no exact task-batched implementation is known for this class"


class _Run:
    """One forward pass: fast weights by variable, the mode, batch-norm statistics."""

    def __init__(self, index: dict, params: Sequence[tf.Tensor], training: bool,
                 norm_stats=None, collect=None, roots: dict | None = None, after=None):
        self.index, self.params, self.training = index, list(params), training
        # {layer name: fn}: fn(output) replaces that layer's output (CAVIA's FiLM).
        self.after = after or {}
        self.norm_stats, self.collect, self.norm_index = norm_stats, collect, 0
        self.dtype = self.params[0].dtype if self.params else None
        # Graphs of nested models, by id: a nested subclassed model is traced once.
        self.roots = {} if roots is None else roots

    def weight(self, variable) -> tf.Tensor:
        """The value of ``variable`` with a task axis: ``[T, *shape]`` if it is meta-learned,
        ``[1, *shape]`` (broadcast over tasks) if the model holds it frozen."""
        i = self.index.get(id(variable))
        if i is not None:
            return self.params[i]
        value = tf.expand_dims(tf.convert_to_tensor(variable.value), 0)
        return value if self.dtype is None else tf.cast(value, self.dtype)

    def next_norm_stats(self, channels_last: bool):
        """(running statistics or None, the collect list or None) for the next batch norm."""
        if self.norm_stats is None and self.collect is None:
            return None, None
        if not channels_last:
            raise ValueError("Per-step batch-norm statistics (MAML++ BNRS) need batch norm "
                             "over the last (channels) axis.")
        stats = self.norm_stats[self.norm_index] if self.norm_stats is not None else None
        self.norm_index += 1
        return stats, self.collect

    def run(self, root, x):
        kind, obj = root
        if kind == "chain":
            # Under --precision=mixed_bfloat16, each run of layers without kernels between
            # two that have them (batch norm, ReLU, pooling) is one fused program.
            for fusable, group in itertools.groupby(obj, key=self._fusable):
                group = list(group)
                if fusable:
                    x = mixed.fused(lambda t, group=group: self.run(("chain", group), t), x,
                                    xla=self._fusable_by_xla)
                else:
                    for layer in group:
                        x = self.call(layer, (x,), {})
            return x
        return obj._run_through_graph(x, operation_fn=lambda op: (
            lambda *args, **kwargs: self.call(op, args, kwargs)))

    def call(self, op, args, kwargs):
        if isinstance(op, keras.Model):
            if id(op) not in self.roots:
                self.roots[id(op)] = _root_of(op)
            out = self.run(self.roots[id(op)], args[0])
        elif self._fusable(op):   # --precision=mixed_bfloat16: fused, in float32
            out = self._fused(op, args, kwargs)
        else:
            out = self._call(op, args, kwargs)
        fn = self.after.get(getattr(op, "name", None))
        if fn is not None and mixed.kernel_dtype() is not None:
            out = tf.cast(out, tf.float32)
        return out if fn is None else fn(out)

    def _fusable(self, op) -> bool:
        return (mixed.kernel_dtype() is not None and not isinstance(op, keras.Model)
                and not _has_kernels(op))

    def _fused(self, op, args, kwargs):
        flat = tf.nest.flatten((args, kwargs))
        where = [i for i, v in enumerate(flat) if tf.is_tensor(v)]

        def fn(*tensors):
            values = list(flat)
            for i, t in zip(where, tensors):
                values[i] = t
            return self._call(op, *tf.nest.pack_sequence_as((args, kwargs), values))
        return mixed.fused(fn, *[flat[i] for i in where], xla=self._fusable_by_xla)

    @property
    def _fusable_by_xla(self) -> bool:
        # Batch norm that collects or is given statistics appends to a Python list: such a
        # pass runs in TensorFlow's kernels (evaluation's support mode, MAML++'s BNRS).
        return self.norm_stats is None and self.collect is None

    def _call(self, op, args, kwargs):
        if isinstance(op, L.TaskBatchedLayer):
            params = [self.weight(v) for v in op.weights]
            if isinstance(op, L.BatchNorm):
                stats, collect = self.next_norm_stats(True)
                if stats is not None or collect is not None:
                    return op.batched_apply(params, args[0], self.training, stats, collect)
            return op.batched_apply(params, args[0], self.training)
        entry = KL.SUPPORTED.get(type(op))
        if entry is not None and entry[0](op) is None:
            return entry[1](op, self, *args, **kwargs)
        if isinstance(op, KL.ELEMENTWISE_OPS):
            return op(*args, **kwargs)
        return self.per_task(op, args, kwargs)

    def per_task(self, op, args, kwargs):
        """An operation without a batched implementation: its own call, task by task."""
        tensors = [a for a in tf.nest.flatten((args, kwargs)) if tf.is_tensor(a)]
        tasks = tensors[0].shape[0]
        if isinstance(op, keras.layers.Layer) and getattr(op, "_call_has_training_arg", False):
            kwargs = {**kwargs, "training": self.training}
        outs = []
        for t in range(tasks):
            a, k = tf.nest.map_structure(lambda v: v[t] if tf.is_tensor(v) else v, (args, kwargs))
            if isinstance(op, keras.layers.Layer) and op.weights:
                trainable = [self.weight(v) for v in op.trainable_variables]
                y, _ = op.stateless_call([w[t] if w.shape[0] == tasks else w[0] for w in trainable],
                                         [v.value for v in op.non_trainable_variables], *a, **k)
            else:
                y = op(*a, **k)
            outs.append(y)
        return tf.nest.map_structure(lambda *o: tf.stack(o), *outs)


def _has_kernels(op) -> bool:
    """Whether the layer's matmul or convolution follows ``mixed``'s policy (through
    models.layers.conv2d or mixed.matmul); under --precision=mixed_bfloat16 every other layer
    runs ``mixed.fused``."""
    if isinstance(op, (L.Conv2D, L.Dense)):
        return True
    entry = KL.SUPPORTED.get(type(op))   # exactly these classes: a subclass may change call
    return (type(op) in (keras.layers.Dense, keras.layers.Conv2D) and entry is not None
            and entry[0](op) is None)


class FunctionalModel:
    """A stateless, task-batched view of a built ``keras.Model``.

    Args:
      model: any built Keras model (Sequential, Functional or subclassed).
      strict: raise ``InexactModelError`` if a layer's second derivative is not known to
        be exact (what second-order learners need); False warns instead (first-order
        learners, which only need first derivatives, pass False).
    """

    def __init__(self, model: keras.Model, strict: bool = True):
        if not isinstance(model, keras.Model):
            raise TypeError(f"Expected a keras.Model, got {type(model).__name__}.")
        if not model.built:
            raise ValueError(f"Build the model {model.name!r} (call it once on a batch of "
                             "examples, or give it a keras.Input) before meta-learning it.")
        self.model = model
        self.variables = list(model.trainable_variables)
        if not self.variables:
            raise ValueError(f"The model {model.name!r} has no trainable variables to meta-learn.")
        self._index = {id(v): i for i, v in enumerate(self.variables)}
        self.non_trainable = list(model.non_trainable_variables)
        self.problems: list[str] = []
        self._roots: dict = {}
        try:
            self._root = _root_of(model)
        except TypeError as e:
            self._root = None
            self.problems.append(f"the model {model.name!r} ({type(model).__name__}): {e}")
        if self._root is not None:
            self._check(self._root)
        self.batched = self._root is not None
        if self.problems:
            message = inexact_message(self.problems)
            if strict:
                raise InexactModelError(message)
            warnings.warn(message, stacklevel=3)

    def _check(self, root) -> None:
        owned: set[int] = set()
        for op in _ops(root):
            owned.update(id(v) for v in _weights(op))
            reason = _unsupported_reason(op)
            if reason is not None:
                # keras.ops calls in a Functional graph are operations, not layers.
                kind = "layer" if isinstance(op, keras.layers.Layer) else "operation"
                self.problems.append(f"{kind} {op.name!r} ({type(op).__name__}): {reason}")
        stray = [v.path for v in self.variables if id(v) not in owned]
        if stray:
            self.problems.append(f"variables used outside any layer call, which the fast weights "
                                 f"would not reach: {', '.join(stray)}")

    @property
    def names(self) -> list[str]:
        return [v.path for v in self.variables]

    def meta_weights(self) -> list[tf.Tensor]:
        return [v.value for v in self.variables]

    def apply(self, params: Sequence[tf.Tensor], x: tf.Tensor, training: bool | None = None,
              norm_stats: Sequence | None = None, collect: list | None = None,
              after: dict | None = None) -> tf.Tensor:
        """params: ``[T, *shape]`` per variable; x: ``[T, N, ...]`` -> ``[T, N, out]``.

        training: dropout on or off (None: on, except inside ``inference()``).
        norm_stats: optional ``(mean [C], var [C])`` for each batch-norm call in order, used
        instead of batch statistics; collect: a list that receives each batch-norm call's
        batch ``(mean, var)``; after: ``{layer name: fn}``, each ``fn(output) -> output``
        applied to that layer's output ``[T, N, ...]`` (CAVIA's FiLM).
        """
        training = _MODE.training if training is None else training
        if norm_stats is None and collect is None:
            norm_stats, collect = _NORM.stats, _NORM.collect
        if self._root is None:
            if norm_stats is not None or collect is not None or after:
                raise ValueError("norm_stats / collect / after need a model whose graph can be "
                                 "walked.")
            with mixed.kernels_in(None):   # Keras' own calls, which the policy does not reach
                return self._per_task_model(params, x, training)
        run = _Run(self._index, params, training, norm_stats, collect, self._roots, after)
        out = run.run(self._root, x)
        if norm_stats is not None and run.norm_index != len(norm_stats):
            raise ValueError(f"{len(norm_stats)} batch-norm statistics given, "
                             f"{run.norm_index} batch-norm calls made.")
        return out

    def _per_task_model(self, params, x, training):
        outs = []
        for t in range(x.shape[0]):
            y, _ = self.model.stateless_call([p[t] for p in params],
                                             [v.value for v in self.non_trainable],
                                             x[t], training=training)
            outs.append(y)
        return tf.stack(outs)

    # -- views used by algorithms that treat parts of the network apart ----------------
    def _require_graph(self, what: str) -> None:
        if self._root is None:
            raise ValueError(f"{what} needs a model whose layer graph can be walked; "
                             f"{inexact_message(self.problems)}")

    def _ops(self) -> list:
        self._require_graph("this algorithm")
        return _ops(self._root)

    def param_layers(self) -> list:
        """The layer that owns each entry of ``variables`` (same order)."""
        owner = {id(v): op for op in self._ops() for v in _weights(op)}
        return [owner[id(v)] for v in self.variables]

    def batch_norm_channels(self) -> list[int]:
        """Channels of each batch-norm call, in order (for per-step running statistics)."""
        return [int(op.gamma.shape[0]) if isinstance(op, L.BatchNorm)
                else int(op.moving_mean.shape[0])
                for op in self._ops() if KL.is_batch_norm(op)]

    def split_head(self) -> tuple["LayerStack", "LayerStack"]:
        """(body, head): the head is the last layer with weights (the classifier) with any
        weightless layers after it; the body is everything before. ``body.apply`` maps
        ``[T, N, ...]`` to features ``[T, N, D]``; ``head.apply`` maps features to outputs.
        The head's weights must be the last entries of ``variables``."""
        self._require_graph("split_head (ANIL, ProtoNets, pre-training)")
        kind, obj = self._root
        if kind == "chain":
            last = max(i for i, layer in enumerate(obj) if layer.trainable_variables)
            body, head = ("chain", obj[:last]), ("chain", obj[last:])
        else:
            body, head = _split_graph(obj)
        return self._stack(body), self._stack(head)

    def _stack(self, root) -> "LayerStack":
        ids = {id(v) for op in _ops(root) for v in _weights(op)}
        return LayerStack(root, [v for v in self.variables if id(v) in ids])


def _split_graph(functional):
    """(body root, head root) of a Functional model that ends in a chain of single-input
    layers, the first of which has weights."""
    why = ("ANIL, ProtoNets and pre-training need a model that ends in a layer with weights "
           "(the head, e.g. Dense) followed only by single-input layers")
    if len(functional.outputs) != 1:
        raise ValueError(f"{why}; this one has {len(functional.outputs)} outputs.")
    tensor, chain = functional.outputs[0], []
    while True:
        op, node_index, _ = tensor._keras_history
        node = op._inbound_nodes[node_index]
        if node.is_input or not isinstance(op, keras.layers.Layer) or len(node.input_tensors) != 1:
            raise ValueError(f"{why}; found {type(op).__name__} {op.name!r} first.")
        chain.insert(0, op)
        tensor = node.input_tensors[0]
        if op.trainable_variables:
            break
    return ("graph", keras.Model(functional.inputs, tensor)), ("chain", chain)


class LayerStack:
    """A part of a ``FunctionalModel`` (body or head) with the same ``apply`` interface."""

    def __init__(self, root, variables: list):
        self._root = root
        self.variables = variables
        self._index = {id(v): i for i, v in enumerate(variables)}

    def meta_weights(self) -> list[tf.Tensor]:
        return [v.value for v in self.variables]

    def feature_maps(self) -> "LayerStack":
        """This stack without its final Flatten or global pooling layer, so that it outputs
        feature maps (Relation Networks), for a chain (Sequential) and a graph (Functional)
        alike; itself if it does not end in one."""
        kind, obj = self._root
        flatten = (L.Flatten, L.GlobalAvgPool, keras.layers.Flatten,
                   keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D)
        if kind == "chain" and obj and isinstance(obj[-1], flatten):
            return LayerStack(("chain", obj[:-1]), self.variables)
        if kind == "graph" and len(obj.outputs) == 1:
            op, node_index, _ = obj.outputs[0]._keras_history
            node = op._inbound_nodes[node_index]
            if isinstance(op, flatten) and not node.is_input and len(node.input_tensors) == 1:
                return LayerStack(("graph", keras.Model(obj.inputs, node.input_tensors[0])),
                                  self.variables)
        return self

    def apply(self, params: Sequence[tf.Tensor], x: tf.Tensor, training: bool | None = None,
              **_) -> tf.Tensor:
        training = _MODE.training if training is None else training
        return _Run(self._index, params, training, _NORM.stats, _NORM.collect).run(self._root, x)


def inexact_message(problems: list[str]) -> str:
    return ("maml_tf cannot guarantee exact second-order meta-gradients through this model: "
            + "; ".join(problems) + ". Fixes: build the model from the supported Keras layers "
            "(Dense, Conv2D, DepthwiseConv2D, BatchNormalization, LayerNormalization, "
            "MaxPooling2D, AveragePooling2D, Global{Average,Max}Pooling2D, Dropout, activations, "
            "Add, Concatenate, Flatten, Reshape, ...) or from maml_tf.models.layers (a custom "
            "layer can implement TaskBatchedLayer.batched_apply); use a first-order algorithm "
            "(first_order=True, fomaml, reptile), which only needs first derivatives; or pass "
            "allow_inexact=True (--allow_inexact on the command line) to accept it with a "
            "warning.")


def tile_for_tasks(weights: Sequence[tf.Tensor], num_tasks: int) -> list[tf.Tensor]:
    """Meta-weights ``[*shape]`` -> per-task copies ``[T, *shape]`` (gradient sums over T)."""
    return [tf.broadcast_to(w, [num_tasks] + w.shape.as_list()) for w in weights]
