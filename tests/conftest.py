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
import threading
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
    if os.environ.get("MAML_TF_ISOLATED") != "1" and os.path.exists("/proc/self/smaps_rollup"):
        # (An isolated child is part of its parent's tree, which the parent measures.)
        config.pluginmanager.register(_TreeMemory(), "maml_tf_tree_memory")
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
        reasons included. A child that grows beyond CHILD_BATCH_GB ends its batch early, and
        the rest of the variants go on in a new child, as they do after a child that died."""
        from _pytest.reports import TestReport
        items = item.session.items
        batch = [item]
        for later in items[items.index(item) + 1:]:
            if later.get_closest_marker("isolated") is None or _variant_of(later) != _variant_of(item):
                break
            batch.append(later)
        remaining = batch
        while remaining:
            start = time.perf_counter()
            proc, ended_early = self._one_child(remaining)
            left = [b for b in remaining if not self._finished(b)]
            if left and (not ended_early or len(left) == len(remaining)):
                # Tests run in order: the child died (or could not collect) in left[0], which
                # fails with the child's output; the rest go on in a new child.
                self._reports[left[0].nodeid] = [TestReport(
                    left[0].nodeid, left[0].location, dict.fromkeys(left[0].keywords, 1), "failed",
                    f"its isolated run exited with {proc.returncode} without a result for this "
                    f"test:\n{proc.stdout[-6000:]}", "call", duration=time.perf_counter() - start)]
                left = left[1:]
            remaining = left

    def _finished(self, item) -> bool:
        return any(r.when == "call" or r.outcome != "passed" for r in self._reports.get(item.nodeid, []))

    def _one_child(self, batch) -> tuple[subprocess.CompletedProcess, bool]:
        """Runs ``batch`` in one child and keeps its reports: (the child, whether it ended the
        batch early to free its memory)."""
        with tempfile.NamedTemporaryFile(prefix="maml_tf_isolated_", suffix=".jsonl",
                                         delete=False) as f:
            reports_path = f.name
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
                + [b.nodeid for b in batch],
                cwd=str(batch[0].config.rootpath), stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True,
                env={**os.environ, "MAML_TF_ISOLATED": "1", "MAML_TF_ISOLATED_REPORTS": reports_path})
            with open(reports_path) as f:   # (a child killed mid-line leaves a torn last line)
                lines = [json.loads(line) for line in f if line.endswith("\n")]
        finally:
            os.unlink(reports_path)
        hook, ended_early = self._config.hook, False
        for data in lines:
            if data == BATCH_ENDED:
                ended_early = True
                continue
            # (JSON turns the tuples of a skip's reason and a test's location into lists.)
            for key in ("location", "longrepr"):
                if isinstance(data.get(key), list):
                    data[key] = tuple(data[key])
            report = hook.pytest_report_from_serializable(config=self._config, data=data)
            self._reports.setdefault(report.nodeid, []).append(report)
        return proc, ended_early

    def pytest_sessionstart(self, session):
        self._session = session

    def pytest_runtest_logfinish(self, nodeid, location):
        # In an isolated child: a batch of variants shares one process, whose compiled programs
        # pile up (measured: 1.8 GB after the first of train_test.py's five outer-update
        # variants, 3.4 GB after the fifth); beyond CHILD_BATCH_GB the rest go to a new child.
        path = os.environ.get("MAML_TF_ISOLATED_REPORTS")
        if (path and os.environ.get("MAML_TF_ISOLATED") == "1"
                and os.path.exists("/proc/self/statm") and _rss_gb() > CHILD_BATCH_GB):
            with open(path, "a") as f:
                f.write(json.dumps(BATCH_ENDED) + "\n")
            self._session.shouldstop = f"the isolated batch ends above {CHILD_BATCH_GB} GB"

    def pytest_runtest_logreport(self, report):
        # In an isolated child: hand each report to the parent (see _run_child).
        path = os.environ.get("MAML_TF_ISOLATED_REPORTS")
        if path and os.environ.get("MAML_TF_ISOLATED") == "1":
            data = self._config.hook.pytest_report_to_serializable(config=self._config, report=report)
            with open(path, "a") as f:
                f.write(json.dumps(data) + "\n")


# An isolated child's note that it ended its batch early (see _Isolation.pytest_runtest_logfinish).
BATCH_ENDED = {"maml_tf_isolated_batch": "ended early"}
# At 2 GB the suite's processes peaked at 5.77 GB (PSS) during the outer-update batch in
# session 23's CI run, a child of up to 2.3 GB beside this process at 3.3-3.8 GB: too close to
# the budget. At 1.5 GB those five variants take four children (1.4-1.9 GB after each test,
# 2.1 GB at most, measured).
CHILD_BATCH_GB = 1.5


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
# flagfile runs). The session reports the peak of its processes together (this one and the ones
# it started, _TreeMemory) and fails above the budget (set MAML_TF_ENFORCE_MEMORY_BUDGET=0 to
# only report it, e.g. for a partial run under a profiler).
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
        # (Measured: the split test in train_test.py left Omniglot's decoded splits, 0.5 GB,
        # cached in this process while the next tests' training commands ran beside it.)
        _drop_data_caches()
        gc.collect()
    _malloc_trim()


@pytest.fixture(autouse=True, scope="module")
def _fresh_module_state():
    yield
    if os.environ.get("MAML_TF_ISOLATED") == "1":
        return   # an isolated child runs one module's tests and exits: its end frees everything
    _drop_data_caches()
    import keras
    keras.backend.clear_session(free_memory=True)
    gc.collect()
    _malloc_trim()


def _drop_data_caches() -> None:
    """The data loaders cache decoded arrays (hundreds of MB for Omniglot's splits) for the life
    of a process: a test module's end drops them, and so does a test that leaves this process
    above COLLECT_ABOVE_GB."""
    from maml_tf import data as data_lib
    from maml_tf.data import mini_imagenet, omniglot
    for cached in (data_lib._dedicated, data_lib._generic_cached, data_lib._generic_rotated,
                   omniglot.load_raw, omniglot.load_all, mini_imagenet._load):
        cached.cache_clear()


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
    # With the clock time, and in the parent the whole tree's memory now (see _TreeMemory).
    path = os.environ.get("MAML_TF_TEST_PROFILE")
    start = time.perf_counter()
    yield
    if path and os.path.exists("/proc/self/statm"):
        tree = item.config.pluginmanager.get_plugin("maml_tf_tree_memory")
        with open(path, "a") as f:
            f.write(json.dumps({
                "test": item.nodeid, "seconds": round(time.perf_counter() - start, 2),
                "end": time.strftime("%H:%M:%S"), "pid": os.getpid(),
                "rss_gb": round(_rss_gb(), 3),
                "peak_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3),
                "tree_peak_gb": round(tree.peak_gb, 3) if tree else None,
            }) + "\n")


def pytest_sessionfinish(session, exitstatus):
    own_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    children_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20
    tree = session.config.pluginmanager.get_plugin("maml_tf_tree_memory")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if tree is not None:
        tree.stop()
        peak_gb, what = tree.peak_gb, (f"this pytest process and the processes it started, "
                                       f"PSS: {tree.peak_gb:.2f} GB during {tree.peak_test}")
    else:   # no smaps_rollup (Linux before 4.14, or not Linux): this process alone
        peak_gb, what = own_gb, f"this pytest process alone: {own_gb:.2f} GB"
    if reporter is not None:
        reporter.write_sep("-", f"peak memory of the test suite ({what}; budget "
                                f"{MEMORY_TARGET_GB} GB). Peak RSS of this process: "
                                f"{own_gb:.2f} GB, of its largest subprocess: {children_gb:.2f} GB")
        top = sorted(tree.by_test.items(), key=lambda kv: -kv[1])[1:4] if tree else []
        if top:
            reporter.write_line("next highest: " + "; ".join(f"{gb:.2f} GB during {test}"
                                                             for test, gb in top))
    enforce = os.environ.get("MAML_TF_ENFORCE_MEMORY_BUDGET", "1") != "0"
    if enforce and peak_gb > MEMORY_TARGET_GB and session.testscollected >= 200 and exitstatus == 0:
        if reporter is not None:
            reporter.write_line(f"FAILED: the test suite's peak memory {peak_gb:.2f} GB exceeds "
                                f"its {MEMORY_TARGET_GB} GB budget (tests/conftest.py).")
        session.exitstatus = 1


class _TreeMemory:
    """The memory of this pytest process and of every process it started (isolated tests'
    children, the training commands tests run, and theirs), sampled on a thread every
    SAMPLE_SECONDS as PSS, which counts pages shared between processes (TensorFlow's libraries)
    once, as the machine does. The budget is the tree's: measured in session 22, this process at
    4.3 GB plus a 2-3 GB training command beside it took the machine's used memory to 7.2 GB,
    while this process alone stayed under 6. Peaks are put down to the test that started last
    (for an isolated batch of variants: its first)."""

    SAMPLE_SECONDS = 2.0   # a sample reads each process's smaps_rollup: 25-35 ms measured

    def __init__(self):
        self.peak_gb, self.peak_test, self._test = 0.0, None, None
        self.by_test: dict[str, float] = {}   # the peak while each test ran
        self._done = threading.Event()
        threading.Thread(target=self._sample, name="maml_tf_tree_memory", daemon=True).start()

    def pytest_runtest_logstart(self, nodeid, location):
        self._test = nodeid

    def stop(self) -> None:
        self._done.set()

    def _sample(self) -> None:
        while not self._done.wait(self.SAMPLE_SECONDS):
            gb, test = _tree_pss_gb(os.getpid()), self._test
            if gb > self.peak_gb:
                self.peak_gb, self.peak_test = gb, test
            if test is not None and gb > self.by_test.get(test, 0.0):
                self.by_test[test] = gb


def _tree_pss_gb(root: int) -> float:
    """Summed PSS (GB) of process ``root`` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:   # "pid (comm) state ppid ..."
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):   # (a process that just ended)
                continue
            children.setdefault(ppid, []).append(int(name))
    total_kb, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total_kb += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration, ValueError):
            continue
    return total_kb / 2 ** 20
