"""Test set-up: quiet TF, offline TFDS, and where the shared real data sets live."""

import atexit
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Never probe the network from tests: TFDS sources report "offline" at once.
os.environ["MAML_TF_OFFLINE"] = "1"
# Folder and TFDS data decoded by tests (and Keras' and matplotlib's files) go to a cache folder
# of this session, not ~/.cache/maml_tf.
if "MAML_TF_CACHE" not in os.environ:   # isolated child processes inherit the parent's
    os.environ["MAML_TF_CACHE"] = tempfile.mkdtemp(prefix="maml_tf_test_cache_")
    atexit.register(shutil.rmtree, os.environ["MAML_TF_CACHE"], ignore_errors=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OMNIGLOT_DIR = os.environ.get("MAML_TF_DATA_DIR") or os.path.join(
    ROOT, "..", "shared", "data", "omniglot")
MINI_IMAGENET_DIR = os.environ.get("MAML_TF_MINI_IMAGENET_DIR") or os.path.join(
    ROOT, "..", "shared", "data", "mini_imagenet_sample")


def _need(path: str, what: str) -> str:
    if not os.path.isdir(path):
        pytest.skip(f"{what} not found at {path}: the shared data folder (../shared/data) is "
                    "absent; set MAML_TF_DATA_DIR / MAML_TF_MINI_IMAGENET_DIR to run this test.")
    return os.path.abspath(path)


@pytest.fixture(scope="session")
def omniglot_dir() -> str:
    return _need(OMNIGLOT_DIR, "Omniglot")


@pytest.fixture(scope="session")
def mini_imagenet_dir() -> str:
    return _need(MINI_IMAGENET_DIR, "The mini-ImageNet sample")


def pytest_configure(config):
    config.pluginmanager.register(_Isolation(), "maml_tf_isolation")
    config.addinivalue_line(
        "markers", "isolated: run this test in a fresh Python process of its own (it traces "
                   "and XLA-compiles whole training runs, whose compiled code TensorFlow keeps "
                   "for the life of a process)")


class _Isolation:
    """Runs the tests marked ``isolated`` in child processes (a plugin object of its own: this
    module's ``pytest_runtest_protocol`` is the profiling wrapper)."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item, nextitem):
        # A test marked `isolated` runs as `python -m pytest <its id>` in a child process, so that
        # what TensorFlow never frees (XLA's compiled clusters, measured at 0.3-0.6 GB per in-process
        # training run) leaves with the child instead of piling up in this one.
        if item.get_closest_marker("isolated") is None or os.environ.get("MAML_TF_ISOLATED") == "1":
            return None
        from _pytest.reports import TestReport
        item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", item.nodeid],
            cwd=str(item.config.rootpath), env={**os.environ, "MAML_TF_ISOLATED": "1"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        duration = time.perf_counter() - start
        tail = proc.stdout[-6000:]
        if proc.returncode == 0:
            reasons = [ln for ln in tail.splitlines() if ln.startswith("SKIPPED")]
            skipped = bool(reasons) and " passed" not in tail
            outcome, longrepr = ("skipped", (str(item.path), item.location[1] or 0,
                                 "in its isolated process: " + reasons[0].split(": ", 1)[-1])
                                 ) if skipped else ("passed", None)
        else:
            outcome, longrepr = "failed", f"isolated run exited with {proc.returncode}:\n{tail}"
        for when in ("setup", "call", "teardown"):
            report = TestReport(item.nodeid, item.location, dict.fromkeys(item.keywords, 1),
                                outcome if when == "call" else "passed",
                                longrepr if when == "call" else None, when,
                                duration=duration if when == "call" else 0.0)
            item.ihook.pytest_runtest_logreport(report=report)
        # As pytest's own protocol ends a test: tear down the scopes (module, class) that the
        # next test does not share, running their finalizers.
        item.session._setupstate.teardown_exact(nextitem)
        item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True


def pytest_collection_modifyitems(config, items):
    # tf.test.TestCase defines `test_session` (a deprecated context manager that skips itself
    # as "Not a test"); drop it so that the skip count only shows real, explained skips.
    items[:] = [item for item in items if item.name != "test_session"]


# The suite must fit CI's memory. Measured sources of growth in one pytest process, each fixed:
# the state of hundreds of traced models kept by pytest's TestCase instances (every test drops
# what its TestCase stored); the data caches (each module's end frees them and the heap);
# Omniglot decoded at once (now in blocks); a Keras optimizer's apply() traced inside a
# tf.function, which keeps the function's graphs for the life of the process (+50 MB per
# contract test: the contract and the training loop apply updates outside the traced step);
# and XLA's compiled clusters, which TensorFlow never frees (0.3-0.6 GB per in-process
# training run: those tests are marked `isolated` and run in child processes, as do the
# flagfile runs). The session reports its peak and fails above the budget (set
# MAML_TF_ENFORCE_MEMORY_BUDGET=0 to only report it, e.g. for a partial run under a profiler).
MEMORY_TARGET_GB = 6.0
COLLECT_ABOVE_GB = 3.0


@pytest.fixture(autouse=True)
def _fresh_keras_state(request):
    yield
    # pytest keeps every unittest.TestCase instance until the session ends, and with it
    # whatever setUp stored (models, learners, their traced and compiled functions): drop
    # those references so that the memory can be freed.
    instance = request.instance
    if instance is not None:
        for name in [n for n in vars(instance) if not n.startswith("_")]:
            delattr(instance, name)
    import keras
    # Without free_memory: its gc.collect() cost 2-3 s per test (10 minutes of the suite);
    # each module's end collects instead, and a test that leaves the process above
    # COLLECT_ABOVE_GB (the compiled-XLA tests) collects at once.
    keras.backend.clear_session(free_memory=False)
    if os.path.exists("/proc/self/statm") and _rss_gb() > COLLECT_ABOVE_GB:
        gc.collect()
    _malloc_trim()


@pytest.fixture(autouse=True, scope="module")
def _fresh_module_state():
    yield
    # The data loaders cache decoded arrays (hundreds of MB for Omniglot's splits) for the
    # life of a process; a test module's end drops them, then returns freed heap to the OS.
    from maml_tf import data as data_lib
    from maml_tf.data import mini_imagenet, omniglot
    for cached in (data_lib._dedicated, data_lib._generic_cached, data_lib._generic_rotated,
                   omniglot.load_raw, omniglot.load_all, mini_imagenet._load):
        cached.cache_clear()
    import keras
    keras.backend.clear_session(free_memory=True)
    gc.collect()
    _malloc_trim()


def _malloc_trim() -> None:
    """glibc keeps freed memory in its arenas (one per thread, and TF runs many): give it back."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    # MAML_TF_TEST_PROFILE=<file>: one JSON line per test with its wall time, the process's
    # resident memory after it and the peak so far, to find the tests that drive the peak.
    path = os.environ.get("MAML_TF_TEST_PROFILE")
    start = time.perf_counter()
    yield
    if path and os.path.exists("/proc/self/statm"):
        with open(path, "a") as f:
            f.write(json.dumps({
                "test": item.nodeid, "seconds": round(time.perf_counter() - start, 2),
                "rss_gb": round(_rss_gb(), 3),
                "peak_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3),
            }) + "\n")


def pytest_sessionfinish(session, exitstatus):
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    children_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_sep("-", f"peak memory of this pytest process: {peak_gb:.2f} GB "
                                f"(budget {MEMORY_TARGET_GB} GB); largest subprocess: "
                                f"{children_gb:.2f} GB")
    enforce = os.environ.get("MAML_TF_ENFORCE_MEMORY_BUDGET", "1") != "0"
    if enforce and peak_gb > MEMORY_TARGET_GB and session.testscollected >= 200 and exitstatus == 0:
        if reporter is not None:
            reporter.write_line(f"FAILED: the test suite's peak memory {peak_gb:.2f} GB exceeds "
                                f"its {MEMORY_TARGET_GB} GB budget (tests/conftest.py).")
        session.exitstatus = 1
