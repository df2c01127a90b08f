"""Keras callbacks in a meta-training run: ``maml_tf.train(config, workdir, callbacks=[...])``.

A meta-training run is not ``Model.fit``, so the run harness calls the hooks at its own
moments, with the names TensorBoard shows:

* ``on_train_begin`` / ``on_train_end`` around the session (``on_train_end`` after the
  results are written; its logs are the headline test values, ``test_accuracy`` ...);
* ``on_train_batch_end(step, logs)`` at the end of each logging window (``--log_every``): the
  window's means, ``meta_loss``, ``grad_norm``, ``query_loss/step_k``,
  ``query_accuracy/step_k``, ``tasks_per_sec``, ``learning_rate`` (RL: its own scalars), and
  Keras' usual ``loss`` (the meta-loss) and ``accuracy`` (after the last inner step);
* ``on_epoch_end(step, logs)`` at each validation (``--eval_every``): the last window's values
  and ``val_accuracy`` / ``val_loss`` / ``val_return`` (after the last test inner step, first
  test shot) with ``_ci95``.

``epoch`` and ``batch`` are the iteration number. A callback that sets
``model.stop_training`` (``EarlyStopping``, ``TerminateOnNaN``) ends meta-training after that
iteration with a checkpoint of it, and the run is evaluated on its test tasks as a finished
one; running the same command again resumes the training.
"""

from __future__ import annotations

from typing import Sequence

import keras


def checked(callbacks) -> list[keras.callbacks.Callback]:
    """``callbacks`` as a list; anything but Keras callbacks is refused (before a run starts)."""
    callbacks = list(callbacks or [])
    for c in callbacks:
        if not isinstance(c, keras.callbacks.Callback):
            raise TypeError(f"callbacks must be keras.callbacks.Callback objects, got "
                            f"{type(c).__name__}.")
    return callbacks


class RunCallbacks:
    """The callbacks of one training session, bound to the run's Keras network."""

    def __init__(self, callbacks: Sequence[keras.callbacks.Callback] | None,
                 model: keras.Model, num_iterations: int):
        callbacks = checked(callbacks)
        self.model = model
        self._list = keras.callbacks.CallbackList(callbacks, model=model, add_history=False,
                                                  add_progbar=False)
        self._list.set_params({"epochs": num_iterations, "steps": num_iterations, "verbose": 0})
        self._window: dict[str, float] = {}
        model.stop_training = False

    def begin(self) -> None:
        self._list.on_train_begin()

    def window(self, step: int, values: dict[str, float] | None) -> None:
        """A logging window ended at ``step`` with ``values`` (TensorBoard's names)."""
        logs = dict(values or {})
        if "meta_loss" in logs:
            logs["loss"] = logs["meta_loss"]
        last = sorted((k for k in logs if k.startswith("query_accuracy/step_")),
                      key=lambda k: int(k.rsplit("_", 1)[1]))
        if last:
            logs["accuracy"] = logs[last[-1]]
        self._window = logs
        self._list.on_train_batch_end(step, logs)

    def validated(self, step: int, point: dict) -> None:
        """The validation at ``step`` gave ``point`` (a learning-curve point)."""
        logs = {**self._window, **{f"val_{k}": v for k, v in point.items() if k != "step"}}
        self._list.on_epoch_end(step, logs)

    @property
    def stop_requested(self) -> bool:
        return bool(getattr(self.model, "stop_training", False))

    def end(self, results: dict | None) -> None:
        logs: dict[str, float] = {}
        test = (results or {}).get("test", {})
        # Per test shot ({"1shot": {"accuracy": ...}}), or one set of metrics (RL).
        for values in [test, *test.values()]:
            for metric in ("accuracy", "loss", "return"):
                if isinstance(values, dict) and isinstance(values.get(metric), dict):
                    logs.setdefault(f"test_{metric}", values[metric]["mean"][-1])
        self._list.on_train_end(logs)
