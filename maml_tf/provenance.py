"""What a result records about where it came from: package, code version, software, device."""

from __future__ import annotations

import functools
import os
import platform
import subprocess

import keras
import tensorflow as tf

from maml_tf.version import VERSION


@functools.lru_cache(maxsize=1)
def git_commit() -> dict | None:
    """The commit of the checkout maml_tf runs from, and whether it had local changes; None
    outside a git checkout (an installed wheel)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        # --no-optional-locks: `git status` would otherwise take the checkout's index.lock,
        # and a user's own git command at that moment would fail.
        run = lambda *args: subprocess.run(["git", "--no-optional-locks", "-C", here, *args],
                                           capture_output=True, text=True, timeout=10,
                                           check=True).stdout.strip()
        return {"commit": run("rev-parse", "HEAD"), "dirty": bool(run("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The CPU features with which oneDNN computes bfloat16 natively: AVX-512 BF16 (Cooper Lake,
# Zen 4 and later) and AMX (Sapphire Rapids and later) on x86, BF16 (Armv8.6) on Arm. Without
# them oneDNN emulates bfloat16 with float32 instructions, slower than float32 itself.
BFLOAT16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The first CPU's feature flags as ``path`` lists them (x86: ``flags``, Arm:
    ``Features``); None where it cannot be read or lists none (macOS, Windows)."""
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return None


def bfloat16_hardware(flags: frozenset[str] | None) -> bool | None:
    """Whether a CPU with ``flags`` (``cpu_flags()``) computes bfloat16 natively; None if
    unknown."""
    return None if flags is None else bool(flags & BFLOAT16_FLAGS)


def environment(strategy: tf.distribute.Strategy | None = None) -> dict:
    devices = [d.name for d in tf.config.list_logical_devices() if d.device_type != "CPU"]
    return {"maml_tf": VERSION, "git": git_commit(), "tensorflow": tf.__version__,
            "keras": keras.__version__, "python": platform.python_version(),
            "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
            "cpu_bfloat16": bfloat16_hardware(cpu_flags()),
            "accelerators": devices or None,
            "replicas": strategy.num_replicas_in_sync if strategy is not None else 1}
