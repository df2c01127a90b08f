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
    config.pluginmanager.register(_Isolation(config), "maml_tf_isolation")
    config.addinivalue_line(
        "markers", "isolated: run this test in a fresh Python process of its own (it traces "
                   "and XLA-compiles whole training runs, whose compiled code TensorFlow keeps "
                   "for the life of a process)")


class _Isolation:
    """Runs the tests marked ``isolated`` in child processes (a plugin object of its own: this
    module's ``pytest_runtest_protocol`` is the profiling wrapper)."""

    def __init__(self, config):
        self._config = config
        self._reports: dict[str, list] = {}   # nodeid -> its reports from a finished child

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item, nextitem):
        # A test marked `isolated` runs as `python -m pytest <its id>` in a child process, so that
        # what TensorFlow never frees (XLA's compiled clusters, measured at 0.3-0.6 GB per in-process
        # training run) leaves with the child instead of piling up in this one. The parameter
        # variants of one test share a child: a child's start-up (Python, TensorFlow, collection)
        # measured 5-6 s, its first Keras import 4 s more, and a test's variants compile a few
        # similar programs at most.
        if item.get_closest_marker("isolated") is None or os.environ.get("MAML_TF_ISOLATED") == "1":
            return None
        item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        if item.nodeid not in self._reports:
            self._run_child(item)
        for report in self._reports.pop(item.nodeid):
            item.ihook.pytest_runtest_logreport(report=report)
        # As pytest's own protocol ends a test: tear down the scopes (module, class) that the
        # next test does not share, running their finalizers.
        item.session._setupstate.teardown_exact(nextitem)
        item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def _run_child(self, item):
        """Runs ``item`` and the variants of the same test that follow it in one child, which
        writes each of its test reports as pytest serialises them (``pytest_runtest_logreport``
        below); they are replayed here as this process's own, failures' tracebacks and skips'
        reasons included."""
        items = item.session.items
        batch = [item]
        for later in items[items.index(item) + 1:]:
            if later.get_closest_marker("isolated") is None or _variant_of(later) != _variant_of(item):
                break
            batch.append(later)
        with tempfile.NamedTemporaryFile(prefix="maml_tf_isolated_", suffix=".jsonl",
                                         delete=False) as f:
            reports_path = f.name
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
                + [b.nodeid for b in batch],
                cwd=str(item.config.rootpath), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, env={**os.environ, "MAML_TF_ISOLATED": "1",
                                "MAML_TF_ISOLATED_REPORTS": reports_path})
            with open(reports_path) as f:   # (a child killed mid-line leaves a torn last line)
                lines = [json.loads(line) for line in f if line.endswith("\n")]
        finally:
            os.unlink(reports_path)
        hook = self._config.hook
        for data in lines:
            # (JSON turns the tuples of a skip's reason and a test's location into lists.)
            for key in ("location", "longrepr"):
                if isinstance(data.get(key), list):
                    data[key] = tuple(data[key])
            report = hook.pytest_report_from_serializable(config=self._config, data=data)
            self._reports.setdefault(report.nodeid, []).append(report)
        from _pytest.reports import TestReport
        duration = time.perf_counter() - start
        for b in batch:
            # A test the child never reported on (it crashed, or could not collect the test)
            # fails with the child's output.
            if not any(r.when == "call" or r.outcome != "passed" for r in self._reports.get(b.nodeid, [])):
                self._reports[b.nodeid] = [TestReport(
                    b.nodeid, b.location, dict.fromkeys(b.keywords, 1), "failed",
                    f"its isolated run exited with {proc.returncode} without a result for this "
                    f"test:\n{proc.stdout[-6000:]}", "call", duration=duration)]

    def pytest_runtest_logreport(self, report):
        # In an isolated child: hand each report to the parent (see _run_child).
        path = os.environ.get("MAML_TF_ISOLATED_REPORTS")
        if path and os.environ.get("MAML_TF_ISOLATED") == "1":
            data = self._config.hook.pytest_report_to_serializable(config=self._config, report=report)
            with open(path, "a") as f:
                f.write(json.dumps(data) + "\n")


def _variant_of(item) -> tuple:
    """What the parameter variants of one test share: its parent (module or class) and its
    name without the parameters (``test_x[a]``) or absl's numeric suffix (``test_x0``)."""
    name = getattr(item, "originalname", None) or item.name
    return item.parent.nodeid, name.split("[")[0].rstrip("0123456789")


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
    if os.environ.get("MAML_TF_ISOLATED") == "1":
        return   # an isolated child runs one module's tests and exits: its end frees everything
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
