"""A run out of its workdir: ``maml_tf.load``, and ``maml_tf.export`` to a ``.keras`` file and to
a SavedModel whose ``adapt_and_predict`` equals the learner's own prediction, loaded in a
process that cannot import maml_tf."""

import concurrent.futures
import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
import tensorflow as tf

import maml_tf
from maml_tf import checkpointing, serving
from maml_tf.config import Config, ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(way=3, shot=1, query=2, num_filters=4, meta_batch_size=2, num_iterations=2,
            val_tasks=3, eval_tasks=3, eval_every=2, checkpoint_every=1, log_every=1,
            jit_compile=False)
RNG = np.random.RandomState(0)
IMAGES = RNG.randint(0, 255, (12 * 5, 10, 10)).astype(np.uint8)
LABELS = np.repeat(np.arange(12), 5)


def trained(workdir: str, algorithm: str, **kw) -> str:
    config = Config(dataset="python", class_split=(6, 3, 3), algorithm=algorithm, **{**TINY, **kw})
    maml_tf.train(config, workdir, data=(IMAGES, LABELS), verbose=0)
    return workdir


def tasks(seed: int, tasks: int = 2, queries: int = 6):
    rng = np.random.RandomState(seed)
    return (rng.rand(tasks, 3, 10, 10, 1).astype("float32"),
            np.tile(np.arange(3, dtype="int32"), (tasks, 1)),
            rng.rand(tasks, queries, 10, 10, 1).astype("float32"))


# In the child: only the standard library's and TensorFlow's folders on sys.path, no site
# processing (so no .pth file, and no editable install of maml_tf), run from an empty folder.
TF_ONLY = """
import importlib.util, json, sys
assert importlib.util.find_spec("maml_tf") is None, "maml_tf is importable"
import numpy as np, tensorflow as tf, keras
args = json.loads(sys.argv[1])
inputs = np.load(args["inputs"])
out = {}
if "saved_model" in args:
    m = tf.saved_model.load(args["saved_model"])
    served = m.signatures["serving_default"](support_x=tf.constant(inputs["sx"]),
                                             support_y=tf.constant(inputs["sy"]),
                                             query_x=tf.constant(inputs["qx"]))
    out["logits"] = served["logits"].numpy()
    out["probabilities"] = served["probabilities"].numpy()
    one = m.adapt_and_predict_task(inputs["sx"][1], inputs["sy"][1], inputs["qx"][1])
    out["one"] = one["logits"].numpy()
if "keras" in args:
    model = keras.models.load_model(args["keras"])
    out["keras"] = model(inputs["qx"][0]).numpy()
    out["layers"] = np.array([type(layer).__module__ for layer in model.layers])
np.savez(args["outputs"], **out)
"""


def run_without_maml_tf(tmp_path, inputs: dict, python: str | None = None, **paths) -> dict:
    """Runs ``TF_ONLY`` with ``python`` (an interpreter of a virtual environment that has
    only TensorFlow), or by default with this interpreter isolated from site processing and
    given only the standard library and the site-packages folder (so no editable install of
    maml_tf: its finder is a .pth file), in an empty folder."""
    np.savez(tmp_path / "inputs.npz", **inputs)
    empty = tmp_path / "empty"
    empty.mkdir(exist_ok=True)
    code, command = TF_ONLY, [python, "-I", "-c"]
    if python is None:
        site = sysconfig.get_paths()["purelib"]
        code = (f"import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p]"
                f" + [{site!r}]\n" + TF_ONLY)
        command = [sys.executable, "-I", "-S", "-c"]
    args = json.dumps({**paths, "inputs": str(tmp_path / "inputs.npz"),
                       "outputs": str(tmp_path / "outputs.npz")})
    proc = subprocess.run(command + [code, args], cwd=empty,
                          env={"PATH": os.environ.get("PATH", ""), "TF_CPP_MIN_LOG_LEVEL": "2"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(tmp_path / "outputs.npz"))


def tensorflow_only_venv(folder) -> str:
    """A new virtual environment with only this TensorFlow (and what it depends on)
    installed from the package index; its python."""
    name = next(n for n in ("tensorflow-cpu", "tensorflow") if _installed(n))
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    python = os.path.join(str(folder), "bin", "python")
    proc = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           f"{name}=={tf.__version__}"], capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"Could not install {name}=={tf.__version__} into a fresh virtual environment "
                    f"(no package index?): {proc.stderr.strip().splitlines()[-1:]}")
    return python


def _installed(distribution: str) -> bool:
    from importlib import metadata
    try:
        metadata.version(distribution)
        return True
    except metadata.PackageNotFoundError:
        return False


@pytest.mark.isolated
def test_the_saved_model_and_keras_file_load_in_a_fresh_tensorflow_only_environment(tmp_path):
    # The environment is made (mostly pip unpacking TensorFlow) while the run trains.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as lane:
        venv = lane.submit(tensorflow_only_venv, tmp_path / "venv")
        workdir = trained(str(tmp_path / "run"), "maml")
        learner = maml_tf.load(workdir)
        sx, sy, qx = tasks(3)
        mine = learner.predict_queries(maml_tf.Episode(sx, sy, qx, None),
                                       mode=learner.config.eval_mode).numpy()
        served = maml_tf.export(workdir, "saved_model", str(tmp_path / "served"))
        keras_file = maml_tf.export(workdir, "keras", str(tmp_path / "net.keras"))
        python = venv.result()
    out = run_without_maml_tf(tmp_path, dict(sx=sx, sy=sy, qx=qx), python=python,
                              saved_model=served, keras=keras_file)
    np.testing.assert_allclose(out["logits"], mine, atol=1e-5)
    np.testing.assert_allclose(out["keras"], learner.model(qx[0]).numpy(), atol=1e-5)


@pytest.mark.isolated
@pytest.mark.parametrize("algorithm", ["maml", "protonet", "snail"])
def test_an_exported_saved_model_adapts_and_predicts_as_the_learner_without_maml_tf(
        algorithm, tmp_path):
    workdir = trained(str(tmp_path / "run"), algorithm)
    learner = maml_tf.load(workdir)
    assert learner.checkpoint_step == 2 and learner.config.algorithm == algorithm
    sx, sy, qx = tasks(1)
    mode = learner.config.eval_mode
    mine = learner.predict_queries(maml_tf.Episode(sx, sy, qx, None), mode=mode).numpy()
    # The prediction is the one evaluation scores: its accuracy is evaluate()'s.
    qy = np.tile(np.repeat(np.arange(3, dtype="int32"), 2), (2, 1))
    scored = learner.evaluate(maml_tf.Episode(sx, sy, qx, qy),
                              steps=learner.config.test_inner_steps)
    np.testing.assert_allclose((mine.argmax(-1) == qy).mean(1), scored.accuracy[:, -1], atol=1e-6)

    served = maml_tf.export(workdir, "saved_model", str(tmp_path / "served"))
    keras_file = maml_tf.export(workdir, "keras", str(tmp_path / "net.keras"))
    out = run_without_maml_tf(tmp_path, dict(sx=sx, sy=sy, qx=qx), saved_model=served,
                              keras=keras_file)
    np.testing.assert_allclose(out["logits"], mine, atol=1e-5)
    np.testing.assert_allclose(out["probabilities"], tf.nn.softmax(mine).numpy(), atol=1e-6)
    np.testing.assert_allclose(out["one"], mine[1], atol=1e-5)
    # The .keras file is the meta-initialisation in standard Keras layers: its outputs on a
    # batch are the network's at the meta-weights (batch norm on the batch's statistics).
    assert all(m.startswith("keras.") for m in out["layers"]), out["layers"]
    np.testing.assert_allclose(out["keras"], learner.model(qx[0]).numpy(), atol=1e-5)


@pytest.mark.isolated
def test_serving_modes_regression_and_the_command_line(tmp_path):
    workdir = trained(str(tmp_path / "run"), "maml")
    learner = maml_tf.load(workdir)
    sx, sy, qx = tasks(2, tasks=1, queries=3)
    for mode in ("support", "per_example"):
        path = maml_tf.export(workdir, "saved_model", str(tmp_path / mode), mode=mode, queries=1)
        served = tf.saved_model.load(path)
        got = served.adapt_and_predict(sx, sy, qx)["logits"].numpy()
        np.testing.assert_allclose(got, learner.predict_queries(
            maml_tf.Episode(sx, sy, qx, None), mode=mode).numpy(), atol=1e-5)
        # Neither mode lets one query's prediction depend on the others.
        alone = served.adapt_and_predict(sx, sy, qx[:, ::-1])["logits"].numpy()[:, ::-1]
        np.testing.assert_allclose(alone, got, atol=1e-5)

    # The command line, and saved_model_cli (how TF Serving's signature is checked).
    out = str(tmp_path / "cli")
    cmd = [sys.executable, "-m", "maml_tf.export", f"--workdir={workdir}", f"--out={out}",
           "--shot=2"]
    # The command line's refusal (below) starts beside the export: each process spends
    # seconds importing TensorFlow.
    refused = subprocess.Popen(cmd[:4] + [f"--out={tmp_path}/y.keras", "--format=keras",
                                          "--shot=5"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "Exported" in proc.stdout, proc.stderr[-2000:]
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    feeds = dict(support_x=np.zeros((1, 6, 10, 10, 1), "float32"),
                 support_y=np.array([[0, 1, 2, 0, 1, 2]], "int32"),
                 query_x=np.zeros((1, 6, 10, 10, 1), "float32"))
    for name, value in feeds.items():
        np.save(tmp_path / f"{name}.npy", value)
    proc = subprocess.run([cli, "run", "--dir", out, "--tag_set", "serve", "--signature_def",
                           "serving_default", "--inputs",
                           ";".join(f"{n}={tmp_path / n}.npy" for n in feeds)],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "probabilities" in proc.stdout, proc.stderr[-2000:]
    # Refusals: one paragraph each. The command line's own one in a process (exit 1, no
    # traceback), the library's in this one (each process costs seconds of TensorFlow import).
    _, err = refused.communicate(timeout=300)
    assert refused.returncode == 1 and "--shot sets what a SavedModel serves" in err, err
    assert "Traceback" not in err
    for args, expected in [((out, "saved_model"), "exists and is not empty"),
                           ((f"{tmp_path}/x.h5", "keras"), "must end in .keras"),
                           ((f"{tmp_path}/z", "saved_model", 7), "no checkpoint ckpt-7")]:
        with pytest.raises(ConfigError, match=expected):
            maml_tf.export(workdir, args[1], args[0], *args[2:])

    # Regression: the served predictions are the adapted network's outputs.
    sine = str(tmp_path / "sine")
    maml_tf.train(Config(dataset="sinusoid", shot=10, query=10, num_iterations=2, meta_batch_size=2, val_tasks=2,
                         eval_tasks=2, eval_every=2, checkpoint_every=2, jit_compile=False),
                  sine, verbose=0)
    learner = maml_tf.load(sine)
    x = np.linspace(-5, 5, 30, dtype="float32").reshape(1, 30, 1)
    support_x, support_y, query_x = x[:, :10], np.sin(x[:, :10]), x[:, 10:20]
    served = tf.saved_model.load(maml_tf.export(sine, "saved_model", str(tmp_path / "sine_sm")))
    got = served.adapt_and_predict(support_x, support_y, query_x)["predictions"].numpy()
    expected = learner.predict(learner.adapt(support_x, support_y), query_x)
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.isolated
def test_load_reads_a_chosen_or_the_newest_loadable_checkpoint_and_changes_nothing(tmp_path):
    workdir = trained(str(tmp_path / "run"), "maml")
    ckpts = os.path.join(workdir, "checkpoints")
    before = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(ckpts, "*"))}
    first = maml_tf.load(workdir, checkpoint=1)
    assert first.checkpoint_step == 1
    # The first conv kernel, as ckpt-1 and ckpt-2 hold it (meta-training changed it).
    key = "optimizer/_trainable_variables/0/.ATTRIBUTES/VARIABLE_VALUE"
    saved = [tf.train.load_checkpoint(os.path.join(ckpts, f"ckpt-{n}")).get_tensor(key)
             for n in (1, 2)]
    assert not np.array_equal(saved[0], saved[1])
    np.testing.assert_array_equal(first.model.variables[0].numpy(), saved[0])
    np.testing.assert_array_equal(maml_tf.load(workdir).model.variables[0].numpy(), saved[1])
    # The newest checkpoint damaged: skipped (with a warning), and left where it is.
    with open(os.path.join(ckpts, "ckpt-2.index"), "r+b") as f:
        f.seek(20)
        f.write(b"\xff" * 16)
    assert maml_tf.load(workdir).checkpoint_step == 1
    assert {p: os.path.getmtime(p) for p in glob.glob(os.path.join(ckpts, "*"))}.keys() == before.keys()
    assert not os.path.exists(os.path.join(ckpts, "damaged"))
    for name in glob.glob(os.path.join(ckpts, "ckpt-1.*")):
        os.remove(name)
    with pytest.raises(checkpointing.CheckpointError, match="can be loaded: ckpt-2"):
        maml_tf.load(workdir)
    shutil.rmtree(ckpts)
    with pytest.raises(checkpointing.CheckpointError, match="has not saved one yet"):
        maml_tf.load(workdir)
    with pytest.raises(ConfigError, match="holds no run"):
        maml_tf.load(str(tmp_path / "nothing"))


def test_reinforcement_learning_runs_are_not_exported_as_saved_models(tmp_path):
    with pytest.raises(ConfigError, match="rollouts"):
        serving.export_saved_model(None, Config(dataset="navigation_2d"), str(tmp_path / "x"))
