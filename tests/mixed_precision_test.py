"""``--precision=mixed_bfloat16`` (models/mixed.py): convolutions and matmuls outside XLA in
a low precision, every other layer fused by XLA in float32. The path itself is checked in
float64 (the same casts, per-task convolutions and fused layers, with float64 as both
dtypes) against the ordinary path and finite differences; its bfloat16 meta-gradient
against float64 at the Omniglot 5-way 1-shot shapes; and a run end to end."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from maml_tf import harness, provenance
from maml_tf.config import Config, ConfigError
from maml_tf.meta_learner import MetaLearner
from maml_tf.models import mixed, zoo
from maml_tf.data.episode import Episode


def _episode(seed, tasks, way, shot, shape, dtype):
    rng = np.random.default_rng(seed)

    def part(n):
        x = rng.uniform(size=(tasks, n * way) + tuple(shape)).astype(dtype)
        y = np.tile(np.repeat(np.arange(way), n), (tasks, 1)).astype("int32")
        return tf.constant(x), tf.constant(y)
    classes = tf.constant(np.tile(np.arange(way), (tasks, 1)).astype("int32"))
    return Episode(*part(shot), *part(2), classes)


def _meta_gradient(learner, episode, steps, policy=None):
    """The meta-gradient in one tf.function (not XLA), traced under ``policy`` (a
    ``kernels_in`` argument tuple) or the ordinary path."""
    @tf.function
    def grad(weights):
        with tf.GradientTape() as tape:
            tape.watch(weights)
            loss, _ = learner.meta_loss(weights, episode, steps)
        return loss, tape.gradient(loss, weights)

    weights = [tf.constant(w) for w in learner.net.meta_weights()]
    if policy is None:
        return grad, weights
    with mixed.kernels_in(*policy):
        grad.get_concrete_function(weights)   # traced under the policy, run outside it
    return grad, weights


def _keras_model(d="float64"):
    """Standard Keras layers: a strided and a dilated convolution (which the mixed path runs
    as im2col), batch norm, a Dense with an activation."""
    L = keras.layers
    inputs = keras.Input((12, 12, 1), dtype=d)
    x = L.Conv2D(4, 3, strides=2, padding="same", dtype=d)(inputs)
    x = L.ReLU(dtype=d)(L.BatchNormalization(dtype=d)(x))
    x = L.Conv2D(4, 3, dilation_rate=2, padding="same", activation="tanh", dtype=d)(x)
    x = L.Dense(5, activation="tanh", dtype=d)(L.GlobalAveragePooling2D(dtype=d)(x))
    return keras.Model(inputs, L.Dense(3, dtype=d)(x))


@pytest.mark.isolated
@pytest.mark.parametrize("pool", ["stride", "max", "keras"])
def test_the_mixed_path_in_float64_is_the_exact_second_order_meta_gradient(pool):
    keras.utils.set_random_seed(4)
    model = _keras_model() if pool == "keras" else zoo.conv4(
        (12, 12, 1), 3, filters=4, pool=pool, blocks=2, dtype="float64")
    learner = MetaLearner(model, inner_lr=0.3, inner_steps=2)
    ep = _episode(1, 3, 3, 2, (12, 12, 1), "float64")
    plain, weights = _meta_gradient(learner, ep, 2)
    mixed64, _ = _meta_gradient(learner, ep, 2, (tf.float64, tf.float64))
    graph = mixed64.get_concrete_function(weights).graph.as_graph_def()
    ops = {n.op for n in graph.node} | {n.op for f in graph.library.function for n in f.node_def}
    assert "Conv2D" in ops   # TensorFlow's own convolution (oneDNN), also at stride 2
    # The fused layers are functions that XLA must compile.
    assert any(f.attr["_XlaMustCompile"].b for f in graph.library.function)
    loss, grads = mixed64(weights)
    loss_ref, grads_ref = plain(weights)
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-12)
    for g, r in zip(grads, grads_ref):
        np.testing.assert_allclose(g.numpy(), r.numpy(), rtol=1e-9, atol=1e-12)
    # And against central finite differences of the loss, along random directions.
    rng = np.random.default_rng(0)
    for _ in range(3):
        v = [rng.normal(size=w.shape) for w in weights]
        norm = np.sqrt(sum((d ** 2).sum() for d in v))
        v = [d / norm for d in v]
        eps = 1e-5
        plus, _ = mixed64([w + eps * d for w, d in zip(weights, v)])
        minus, _ = mixed64([w - eps * d for w, d in zip(weights, v)])
        numeric = (float(plus) - float(minus)) / (2 * eps)
        analytic = sum(float(tf.reduce_sum(g * d)) for g, d in zip(grads, v))
        assert abs(analytic - numeric) <= 1e-6 * max(abs(numeric), 1e-8)
    if pool == "keras":
        # In bfloat16 the dilated convolution's im2col receives bfloat16 activations from the
        # fused layers before it: its kernel must follow (once a BatchMatMulV2 dtype error).
        learner32 = MetaLearner(_keras_model("float32"), inner_lr=0.3, inner_steps=2,
                                compute_dtype="mixed_bfloat16")
        ep32 = Episode(*[tf.cast(t, tf.float32) if t.dtype == tf.float64 else t for t in ep])
        grad32, weights32 = _meta_gradient(learner32, ep32, 2)
        _, grads32 = grad32(weights32)
        assert all(g.dtype == tf.float32 and np.all(np.isfinite(g.numpy())) for g in grads32)


@pytest.mark.isolated
def test_bfloat16_meta_gradient_points_as_float64_at_omniglot_5w1s_shapes():
    # The paper's Omniglot 5-way 1-shot network and step (64 filters, stride-2 convs, batch
    # norm, one inner step of 0.4), 4 tasks; the issue asks cosine >= 0.99 to float64.
    keras.utils.set_random_seed(5)
    model64 = zoo.conv4((28, 28, 1), 5, dtype="float64")
    ep64 = _episode(2, 4, 5, 1, (28, 28, 1), "float64")
    ref, weights = _meta_gradient(MetaLearner(model64, inner_lr=0.4), ep64, 1)
    _, g64 = ref(weights)
    model = zoo.conv4((28, 28, 1), 5)
    model.set_weights(model64.get_weights())
    learner = MetaLearner(model, inner_lr=0.4, compute_dtype="mixed_bfloat16")
    ep = Episode(*[tf.cast(t, tf.float32) if t.dtype == tf.float64 else t for t in ep64])
    grad, weights32 = _meta_gradient(learner, ep, 1)
    _, g16 = grad(weights32)
    assert all(g.dtype == tf.float32 and np.all(np.isfinite(g.numpy())) for g in g16)
    a = np.concatenate([g.numpy().ravel() for g in g64])
    b = np.concatenate([g.numpy().ravel().astype("float64") for g in g16])
    cosine = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    # Measured 0.994 here (an AMX Xeon); the whole model in bfloat16 (--precision=bfloat16)
    # gives 0.85, and so did this path while its inner loop's kernels were bfloat16 too.
    assert cosine >= 0.99, cosine


def test_mixed_precision_compiles_layer_by_layer_and_refuses_a_tpu():
    assert mixed.whole_step_xla("float32", True) and mixed.whole_step_xla("bfloat16", True)
    assert not mixed.whole_step_xla("mixed_bfloat16", True)
    assert not mixed.whole_step_xla("float32", False)
    with pytest.raises(ConfigError, match="--precision=mixed_bfloat16 keeps the kernels"):
        Config(dataset="omniglot", precision="mixed_bfloat16", strategy="tpu")


def test_the_cpu_flags_say_whether_the_cpu_computes_bfloat16(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: Xeon\nflags\t\t: fpu avx512f amx_bf16 avx512_bf16\n"
                   "\nprocessor\t: 1\nflags\t\t: fpu\n")
    old_x86 = tmp_path / "old"
    old_x86.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")
    flags = provenance.cpu_flags(str(x86))
    assert flags == {"fpu", "avx512f", "amx_bf16", "avx512_bf16"}
    assert provenance.bfloat16_hardware(flags) is True
    assert provenance.bfloat16_hardware(provenance.cpu_flags(str(arm))) is True
    assert provenance.bfloat16_hardware(provenance.cpu_flags(str(old_x86))) is False
    assert provenance.cpu_flags(str(tmp_path / "absent")) is None
    assert provenance.bfloat16_hardware(None) is None


def test_mixed_bfloat16_warns_only_on_a_cpu_without_bfloat16_units():
    mixed_config = Config(dataset="omniglot", precision="mixed_bfloat16")
    without, with_amx = frozenset({"avx512f"}), frozenset({"avx512f", "amx_bf16"})
    [message] = harness.hardware_warnings(mixed_config, without, accelerated=False)
    assert "neither avx512_bf16 nor amx_bf16" in message and "--precision=float32" in message
    assert harness.hardware_warnings(mixed_config, with_amx, accelerated=False) == []
    assert harness.hardware_warnings(mixed_config, without, accelerated=True) == []
    assert harness.hardware_warnings(mixed_config, None, accelerated=False) == []   # unknown
    assert harness.hardware_warnings(Config(dataset="omniglot"), without, False) == []


@pytest.mark.isolated
def test_a_mixed_precision_run_trains_and_evaluates_in_every_mode(tmp_path, monkeypatch, caplog):
    """Conv-4 on random images through maml_tf.train: the step without one XLA program, the
    support mode's batch norm (which collects statistics, so runs unfused) and per-example;
    as on a CPU without bfloat16 units, which it is told in a warning."""
    import maml_tf
    monkeypatch.setattr(provenance, "cpu_flags", lambda: frozenset({"avx512f"}))
    rng = np.random.RandomState(0)
    images = rng.randint(0, 255, (12 * 5, 10, 10)).astype(np.uint8)
    labels = np.repeat(np.arange(12), 5)
    config = Config(dataset="python", class_split=(6, 3, 3), way=3, shot=1, query=2,
                    num_filters=4, meta_batch_size=2, num_iterations=4, val_tasks=3,
                    eval_tasks=3, eval_every=2, eval_inner_steps=2,
                    precision="mixed_bfloat16",
                    step_metrics_every=1)   # one meta-step program: a second traces apart
    # One training run (validated in the support mode), then the test tasks in each mode.
    workdir = str(tmp_path / "run")
    results = {"support": maml_tf.train(config.replace(eval_mode="support"), workdir,
                                        data=(images, labels), verbose=1)}
    for mode in ("transductive", "per_example"):
        results[mode] = maml_tf.evaluate_workdir(workdir, data=(images, labels), eval_mode=mode)
    for mode, result in results.items():
        assert result["protocol"]["eval_mode"] == mode
        accuracy = result["test"]["1shot"]["accuracy"]["mean"]
        assert len(accuracy) == 3 and np.isfinite(accuracy).all(), result
        assert result["environment"]["cpu_bfloat16"] is False
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f) == results["support"]
    warned = [r for r in caplog.records if "CPU without bfloat16 units" in r.getMessage()]
    assert len(warned) == 3, [r.getMessage() for r in caplog.records]
