"""Model construction: ``get_model(config)`` returns a built ``keras.Model`` for the
supervised data sets (the task families build what is theirs alone: ``maml_tf.rl`` its
policies, ``maml_tf.supervised`` the CNP's decoder).

``--model`` names the zoo's networks (``auto``, ``mlp``, ``conv4``, ``resnet12``) or a user's
function, ``package.module:function`` or ``path/to/file.py:function``, called as
``function(input_shape, num_outputs)`` and returning a ``keras.Model``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import types
from typing import Callable

import keras
import numpy as np

from maml_tf.config import ConfigError
from maml_tf.models import resnet, zoo
from maml_tf.models.layers import Flatten


def get_model(config, dtype: str = "float32", model_fn: Callable | None = None) -> keras.Model:
    """The network of ``config`` (or ``model_fn``'s), built and checked against the data's
    input shape and output count."""
    if model_fn is not None or config.is_custom_model:
        fn = model_fn or load_model_fn(config.model)
        return build_user_model(fn, input_shape(config), num_outputs(config), dtype)
    shape = input_shape(config)
    if config.is_regression:
        # cbfinn/maml's truncated normal (stddev 0.01): measured here, it keeps 1..10 inner
        # steps stable at alpha = 0.01, where Glorot's init let some 5-shot tasks diverge.
        return zoo.mlp(shape[0], [40, 40], 1, dtype=dtype,
                       kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.01))
    if config.model_name == "mlp":
        # The paper's non-convolutional Omniglot network: 256-128-64-64 with batch norm.
        h, w, c = shape
        return _flattened(zoo.mlp(h * w * c, [256, 128, 64, 64], config.way, batch_norm=True,
                                  dtype=dtype), shape, dtype)
    if config.model_name == "resnet12":
        return resnet.resnet12(shape, config.way, dtype=dtype)
    return zoo.conv4(shape, config.way, filters=config.filters, pool=config.pool,
                     dtype=dtype, norm=config.norm)


def input_shape(config) -> tuple[int, ...]:
    """One example's shape as the network sees it: ``(1,)`` for sinusoid (CAVIA appends its
    ``context_dim`` context entries), ``(H, W, C)`` for images. (A policy's is its
    environment's: ``maml_tf.rl.family`` builds policies.)"""
    if config.is_regression:
        return (1 + (config.context_dim if config.algorithm == "cavia" else 0),)
    return tuple(config.image_shape)


def num_outputs(config) -> int:
    """Outputs of the network: 1 (sinusoid) or way (classification)."""
    return 1 if config.is_regression else config.way


def _flattened(mlp: keras.Sequential, image_shape, dtype) -> keras.Sequential:
    return keras.Sequential([keras.Input(tuple(image_shape), dtype=dtype),
                             Flatten(dtype=dtype, name="flatten")] + mlp.layers, name="mlp")


# While a model file is executed to find its function, a run that its top-level code starts
# (a script without an ``if __name__ == "__main__":`` guard) must not start: it would train
# again. ``entering_run`` stops the file's execution there instead.
_LOADING = types.SimpleNamespace(depth=0)
_FILE_PREFIX = "maml_tf_user_model_"


class _StopLoading(Exception):
    """Raised by ``entering_run`` while a model file is being loaded."""


def entering_run() -> None:
    """Called by ``train`` / ``evaluate_workdir``: refuses to run inside a model file's load."""
    if _LOADING.depth:
        raise _StopLoading()


@contextlib.contextmanager
def _loading():
    _LOADING.depth += 1
    try:
        yield
    finally:
        _LOADING.depth -= 1


def load_model_fn(spec: str) -> Callable:
    """``package.module:function`` or ``path/to/file.py:function`` -> the function."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--model={spec!r} is neither a zoo model (auto, mlp, conv4, resnet12) "
                          "nor 'package.module:function' / 'path/to/file.py:function'.")
    try:
        if module_name.endswith(".py"):
            path = os.path.abspath(module_name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no file {path}")
            name = _FILE_PREFIX + os.path.splitext(os.path.basename(path))[0]
            module_spec = importlib.util.spec_from_file_location(name, path)
            if module_spec is None or module_spec.loader is None:
                raise ImportError(f"{path} cannot be loaded as a Python module")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            with _loading():
                try:
                    module_spec.loader.exec_module(module)
                except _StopLoading:
                    pass   # the script went on to train: its functions above are defined
        else:
            module = importlib.import_module(module_name)
    except Exception as e:   # noqa: BLE001 -- reported as one paragraph
        raise ConfigError(f"--model={spec!r}: the module {module_name!r} could not be loaded "
                          f"({type(e).__name__}: {e}). Run from the directory that holds it, add "
                          "that directory to PYTHONPATH, or give a path: "
                          "--model=path/to/file.py:function.") from None
    fn: object = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ConfigError(f"--model={spec!r}: {module_name!r} has no attribute {attr!r}. "
                              "Name a function(input_shape, num_outputs) that returns a keras.Model.")
    if not callable(fn):
        raise ConfigError(f"--model={spec!r}: {attr!r} is a {type(fn).__name__}, not a function.")
    return fn


def model_spec(fn: Callable) -> str | None:
    """The ``--model`` value that rebuilds ``fn`` in another process, or None (a lambda, a
    function defined inside another, or one without a file)."""
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or not name or "<" in name:
        return None
    if module == "__main__" or module.startswith(_FILE_PREFIX):
        path = getattr(sys.modules.get(module), "__file__", None)
        return f"{os.path.abspath(path)}:{name}" if path else None
    return f"{module}:{name}"


def build_user_model(fn: Callable, shape: tuple[int, ...], outputs: int,
                     dtype: str = "float32") -> keras.Model:
    """Calls ``fn(shape, outputs)``, builds the model on a dummy batch and checks that it
    maps ``[N, *shape]`` to ``[N, outputs]``."""
    name = getattr(fn, "__qualname__", repr(fn))
    try:
        model = fn(tuple(shape), int(outputs))
    except Exception as e:   # noqa: BLE001 -- reported as one paragraph
        raise ConfigError(f"The model function {name}(input_shape={tuple(shape)}, "
                          f"num_outputs={outputs}) raised {type(e).__name__}: {e}") from e
    if not isinstance(model, keras.Model):
        raise ConfigError(f"The model function {name} returned a {type(model).__name__}, not a "
                          "keras.Model: return keras.Model(inputs, outputs), a keras.Sequential "
                          "or an instance of your keras.Model subclass.")
    probe = np.zeros((2,) + tuple(shape), dtype=model.compute_dtype)
    try:
        out = model(probe, training=False)
    except Exception as e:   # noqa: BLE001
        raise ConfigError(f"The model from {name} cannot take inputs of shape "
                          f"{(None,) + tuple(shape)}: {type(e).__name__}: {e}") from e
    if tuple(out.shape) != (2, outputs):
        raise ConfigError(f"The model from {name} maps inputs {(None,) + tuple(shape)} to "
                          f"{(None,) + tuple(out.shape[1:])}; it must give {(None, outputs)} "
                          f"(num_outputs={outputs} logits or values per example).")
    return model
