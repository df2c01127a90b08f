"""The README's install steps in a new virtual environment: `pip install -e .` and then a second
`pip install -e ".[rl]"` leave `maml_tf.models` and `maml_tf.data` importable (a pip that falls
back to `setup.py develop` ignores setup.py's package_dir and loses them)."""

import os
import subprocess
import sys
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_second_editable_install_with_an_extra_keeps_every_subpackage(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # The dependencies (TensorFlow, ...) come from this environment's folder, added as a plain
    # path: its own .pth files, among them this checkout's editable install, are not read.
    with open(os.path.join(site, "zz_dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    hidden = subprocess.run([python, "-c", "import importlib.util as u; "
                             "print(u.find_spec('maml_tf') is None)"],
                            cwd=tmp_path, capture_output=True, text=True, check=True)
    assert hidden.stdout.strip() == "True"
    # Offline and without dependencies (they are there): the two steps of the README.
    for target in (".", ".[rl]"):
        proc = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps",
                               "--no-build-isolation", "--no-index", "-e", target],
                              cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
    check = ("import maml_tf, maml_tf.models, maml_tf.data, maml_tf.data.episode, "
             "maml_tf.models.zoo; print(maml_tf.__file__)")
    proc = subprocess.run([python, "-c", check], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().startswith(os.path.join(ROOT, "maml_tf"))
    proc = subprocess.run([python, "-m", "maml_tf.train", "--help"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "--workdir" in proc.stdout, proc.stderr[-3000:]
