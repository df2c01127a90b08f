"""Test set-up: quiet TF, offline TFDS, and where the shared real data sets live."""

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Never probe the network from tests: TFDS sources report "offline" at once.
os.environ["MAML_TF_OFFLINE"] = "1"

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


def pytest_collection_modifyitems(config, items):
    # tf.test.TestCase defines `test_session` (a deprecated context manager that skips itself
    # as "Not a test"); drop it so that the skip count only shows real, explained skips.
    items[:] = [item for item in items if item.name != "test_session"]
