"""The machine a benchmark ran on: CPU model, cores, vector instruction sets, and the matmul
peak that TensorFlow reaches here in float32 and bfloat16 (the references for "% of peak")."""

from __future__ import annotations

import os
import time


def machine() -> dict:
    """CPU model, cores and the vector instruction sets that matter for fp32 matmuls."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    isa = [name for flag, name in (("avx2", "AVX2"), ("fma", "FMA"), ("avx512f", "AVX-512"),
                                   ("avx512_bf16", "AVX-512 BF16"), ("amx_tile", "AMX"))
           if flag in flags]
    return {"cpu": model, "cores": os.cpu_count(), "isa": isa,
            "kind": "AMX" if "AMX" in isa else "AVX-512" if "AVX-512" in isa else
                    "AVX2" if "AVX2" in isa else "other",
            # oneDNN (TensorFlow's kernels, mixed_bfloat16's bfloat16) builds its kernels for
            # at most this instruction set: a way to measure what a CPU without AMX or
            # AVX-512 BF16 gives, on one that has them. XLA's own kernels ignore it.
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA")}


def tf_matmul_peak(sizes=(1024, 2048, 4096), repeats: int = 5, dtype: str = "float32") -> float:
    """The best GFLOP/s of an n x n matmul in TensorFlow over ``sizes`` (median of ``repeats``
    calls each, after a warm-up), on all of this process's threads: float32 compiled by XLA
    (as the float32 meta-step), bfloat16 through TensorFlow's oneDNN kernel (as
    --precision=mixed_bfloat16's kernels; XLA's CPU backend does not use AMX)."""
    import numpy as np
    import tensorflow as tf
    matmul = tf.function(lambda a: a @ a, jit_compile=dtype == "float32")
    best = 0.0
    for n in sizes:
        a = tf.ones((n, n), dtype=dtype)
        matmul(a).numpy()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            matmul(a).numpy()
            times.append(time.perf_counter() - t0)
        best = max(best, 2 * n ** 3 / float(np.median(times)) / 1e9)
    return best


def describe(info: dict) -> str:
    capped = info.get("onednn_max_cpu_isa")
    return (f"{info['cpu']}, {info['cores']} cores, {' '.join(info['isa']) or 'no AVX'} "
            f"(kind: {info['kind']})" + (f", oneDNN capped at {capped}" if capped else ""))
