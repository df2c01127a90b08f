"""Keras callbacks in ``maml_tf.train``: when they are called, with which names, and a stop
that a callback asks for (a checkpoint, the test evaluation, and the same command resumes)."""

import csv
import json
import os

import keras
import numpy as np
import pytest

import maml_tf
from maml_tf.config import Config

RNG = np.random.RandomState(0)
IMAGES = RNG.randint(0, 255, (12 * 5, 10, 10)).astype(np.uint8)
LABELS = np.repeat(np.arange(12), 5)
RUN = dict(dataset="python", class_split=(6, 3, 3), way=3, shot=1, query=2, num_filters=4,
           meta_batch_size=2, num_iterations=6, val_tasks=3, eval_tasks=3, eval_every=2,
           checkpoint_every=3, log_every=1, eval_inner_steps=2, jit_compile=False)


class Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.calls = []

    def on_train_begin(self, logs=None):
        self.calls.append(("begin", None, dict(logs or {})))

    def on_train_batch_end(self, batch, logs=None):
        self.calls.append(("batch", batch, dict(logs)))

    def on_epoch_end(self, epoch, logs=None):
        self.calls.append(("epoch", epoch, dict(logs)))

    def on_train_end(self, logs=None):
        self.calls.append(("end", None, dict(logs or {})))


@pytest.mark.isolated
def test_callbacks_see_each_window_and_validation_and_can_stop_the_run(tmp_path):
    recorder = Recorder()
    csv_path = str(tmp_path / "log.csv")
    workdir = str(tmp_path / "run")
    # min_delta=1: no validation can improve on the first, so patience=1 stops at the second.
    early = keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", min_delta=1.0,
                                          patience=1)
    results = maml_tf.train(Config(**RUN), workdir, data=(IMAGES, LABELS), verbose=0,
                            callbacks=[recorder, keras.callbacks.CSVLogger(csv_path), early])
    kinds = [(kind, step) for kind, step, _ in recorder.calls]
    assert kinds == [("begin", None), ("batch", 1), ("batch", 2), ("epoch", 2), ("batch", 3),
                     ("batch", 4), ("epoch", 4), ("end", None)]
    batch = recorder.calls[1][2]
    assert batch["loss"] == batch["meta_loss"]
    assert batch["accuracy"] == batch["query_accuracy/step_1"]   # train inner steps: 1
    assert {"grad_norm", "query_loss/step_0", "learning_rate"} <= set(batch)
    epoch = recorder.calls[3][2]
    history = json.load(open(os.path.join(workdir, "history.json")))
    assert epoch["val_accuracy"] == history[0]["accuracy"]
    assert epoch["val_accuracy_ci95"] == history[0]["accuracy_ci95"]
    assert epoch["meta_loss"] == recorder.calls[2][2]["meta_loss"]   # the last window's
    assert recorder.calls[-1][2]["test_accuracy"] == results["test"]["1shot"]["accuracy"]["mean"][-1]
    # The stop: a checkpoint of iteration 4 (not a multiple of --checkpoint_every), evaluated.
    assert early.stopped_epoch == 4
    assert results["protocol"]["checkpoint_step"] == 4
    assert os.path.exists(os.path.join(workdir, "checkpoints", "ckpt-4.index"))
    rows = list(csv.DictReader(open(csv_path)))
    assert [r["epoch"] for r in rows] == ["2", "4"] and "val_accuracy" in rows[0]
    # The same command (without the callback) resumes and finishes.
    again = maml_tf.train(Config(**RUN), workdir, data=(IMAGES, LABELS), verbose=0)
    assert again["protocol"]["checkpoint_step"] == 6
    assert json.load(open(os.path.join(workdir, "sessions.json")))[-1]["from_iteration"] == 4


@pytest.mark.isolated
def test_terminate_on_nan_stops_a_run_that_skips_non_finite_updates(tmp_path):
    workdir = str(tmp_path / "run")
    stop = keras.callbacks.TerminateOnNaN()
    results = maml_tf.train(Config(**{**RUN, "inner_lr": 1e30, "on_nan": "skip"}), workdir,
                            data=(IMAGES, LABELS), verbose=0, callbacks=[stop])
    assert results["protocol"]["checkpoint_step"] == 1
    with pytest.raises(TypeError, match="keras.callbacks.Callback objects"):
        maml_tf.train(Config(**RUN), str(tmp_path / "other"), data=(IMAGES, LABELS), verbose=0,
                      callbacks=[print])
    assert not os.path.exists(tmp_path / "other")   # refused before anything was written
