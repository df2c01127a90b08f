"""What every timed step of the comparison shares: the configurations, the synthetic episode
(same numpy arrays in every framework) and the worker protocol. Pure Python and numpy, so that
the peers' own environment (JAX, PyTorch) can import it without TensorFlow.

A worker builds its step, runs it once (the compile), then answers lines on stdin:
``window N`` -> runs N meta-steps, waits for the result, replies the seconds; ``peak`` ->
this framework's fp32 matmul GFLOP/s; ``quit``. Replies are JSON lines prefixed with ``@@``
on stdout, so that library logs never confuse the driver.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

# Omniglot 5-way 1-shot, Conv-4 (64 filters, stride-2 convs, batch norm, global average
# pool), 1 query per class, meta-batch 32, inner SGD at 0.4, outer Adam at 1e-3.
CONFIGS = {
    "second_1step": dict(inner_steps=1, first_order=False),
    "first_1step": dict(inner_steps=1, first_order=True),
    "second_5steps": dict(inner_steps=5, first_order=False),
}
WAY, SHOT, QUERY, TASKS, SIZE, FILTERS = 5, 1, 1, 32, 28, 64
INNER_LR, META_LR, EPS = 0.4, 1e-3, 1e-3


def episode(seed: int = 0):
    """(support_x [T, way*shot, 28, 28, 1], support_y [T, way*shot], query_x, query_y)."""
    rng = np.random.default_rng(seed)
    img = lambda n: rng.uniform(size=(TASKS, n, SIZE, SIZE, 1)).astype(np.float32)
    lab = lambda k: np.tile(np.repeat(np.arange(WAY), k), (TASKS, 1)).astype(np.int32)
    return img(WAY * SHOT), lab(SHOT), img(WAY * QUERY), lab(QUERY)


def glorot(rng, shape, fan_in, fan_out):
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(np.float32)


def conv4_params(seed: int = 0) -> dict:
    """Conv-4 weights as numpy arrays, HWIO kernels (each framework converts its layout)."""
    rng = np.random.default_rng(seed)
    params, cin = {}, 1
    for i in range(4):
        params[f"conv{i}"] = glorot(rng, (3, 3, cin, FILTERS), 9 * cin, 9 * FILTERS)
        params[f"gamma{i}"] = np.ones(FILTERS, np.float32)
        params[f"beta{i}"] = np.zeros(FILTERS, np.float32)
        cin = FILTERS
    params["head_w"] = glorot(rng, (FILTERS, WAY), FILTERS, WAY)
    params["head_b"] = np.zeros(WAY, np.float32)
    return params


def reply(**values) -> None:
    print("@@" + json.dumps(values), flush=True)


def serve(step, sync, peak) -> None:
    """The worker loop: ``step()`` runs one meta-step asynchronously and returns something
    that ``sync(x)`` waits for; ``peak()`` measures the framework's matmul GFLOP/s."""
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] == "quit":
            return
        if command[0] == "peak":
            reply(gflops=peak())
        elif command[0] == "window":
            t0 = time.perf_counter()
            for _ in range(int(command[1])):
                out = step()
            sync(out)
            reply(seconds=time.perf_counter() - t0)


def time_matmul(run, sync, sizes=(1024, 2048, 4096), repeats: int = 5) -> float:
    """The best fp32 GFLOP/s of ``run(n)`` (an n x n by n x n matmul) over sizes, each the
    median of ``repeats`` timed calls after a warm-up."""
    best = 0.0
    for n in sizes:
        sync(run(n))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sync(run(n))
            times.append(time.perf_counter() - t0)
        best = max(best, 2 * n ** 3 / float(np.median(times)) / 1e9)
    return best
