"""maml_tf's meta-step against the reference steps a user could write instead, timed
interleaved in one run on this machine.

    python benchmarks/peers/compare.py                                  # all three configurations
    python benchmarks/peers/compare.py --configs=second_1step --windows=9 --chunks=0,1,8

Omniglot 5-way 1-shot, Conv-4, meta-batch 32 (``_protocol.py``): one worker process per
implementation (maml_tf at each ``--chunks``; a plain TF ``tf.function`` loop over tasks
without XLA; JAX ``jit`` with tasks by ``vmap`` and by ``lax.map``; PyTorch ``torch.func``
``vmap``), each compiled once,
then ``--windows`` timing windows of about ``--window_seconds`` each, the workers taking
turns in a shuffled order every round so that a slow spell of the machine hits them alike.
tasks/s is the median window. GFLOP/s counts the matmuls of maml_tf's optimized XLA program
(the same meta-gradient for all); % of peak is against the best fp32 matmul rate that any of
the frameworks reaches on this machine (measured in the same run). JAX and PyTorch run from
the peers' own environment (``--peers_python``, see ``README.md`` here); without it their rows
say so. Nothing here is run by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from _protocol import CONFIGS, TASKS  # noqa: E402
from machine import describe, machine  # noqa: E402  (benchmarks/machine.py)


class Worker:
    """One implementation in its own process, driven line by line (``_protocol.serve``)."""

    def __init__(self, label: str, python: str, script: str, args: list[str]):
        self.label, self.rates, self.error = label, [], None
        self.log = tempfile.NamedTemporaryFile("w+", prefix="compare-", suffix=".log", delete=False)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": HERE}
        self.proc = subprocess.Popen([python, os.path.join(HERE, script)] + args, cwd=HERE,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env)
        self.hello = self._read()
        self.steps = 1

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        self.log.seek(0)
        self.error = self.log.read()[-1500:].strip() or "exited without a reply"
        return {}

    def ask(self, command: str) -> dict:
        if self.error:
            return {}
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def window(self) -> float:
        """Runs one window; returns its seconds."""
        return self.ask(f"window {self.steps}").get("seconds", float("nan"))

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


def compare(config: str, chunks: list[int], peers_python: str | None, windows: int,
            window_seconds: float) -> tuple[list[dict], float]:
    """Rows (one per implementation) for ``config`` and the machine's measured matmul peak."""
    here = sys.executable
    specs = [(f"maml_tf, {c} task chunk{'s' if c > 1 else ''}" if c else
              "maml_tf, task chunks chosen (--task_chunks=0)", here, "maml_tf_step.py",
              [config, str(c)]) for c in chunks]
    specs.append(("TF tf.function loop over tasks (no XLA)", here, "tf_loop_step.py", [config]))
    for label, script, args in (("JAX jit + vmap", "jax_step.py", ["vmap"]),
                                ("JAX jit + lax.map", "jax_step.py", ["map"]),
                                ("PyTorch torch.func vmap", "torch_step.py", [])):
        specs.append((label, peers_python, script, [config] + args))
    workers, missing = [], []
    for label, python, script, args in specs:
        if python is None:
            missing.append(label)
            continue
        print(f"  compiling {label} ...", file=sys.stderr, flush=True)
        workers.append(Worker(label, python, script, args))
    for w in workers:
        if w.hello.get("task_chunks") and w.label.endswith("(--task_chunks=0)"):
            w.label += f": {w.hello['task_chunks']}"
    live = [w for w in workers if not w.error]
    # Warm-up window, then size each worker's windows to about window_seconds.
    for w in live:
        seconds = w.window()
        w.steps = max(1, round(window_seconds / max(seconds, 1e-3)))
    for _ in range(windows):
        random.shuffle(live)
        for w in live:
            w.rates.append(w.steps * TASKS / w.window())
    peaks = [w.ask("peak").get("gflops", 0.0) for w in live]
    flops = next((w.hello.get("flops_per_step") for w in workers if w.hello.get("flops_per_step")), None)
    peak = max(peaks) if peaks else float("nan")
    rows = []
    for w in workers:
        w.close()
        if w.error:
            rows.append({"label": w.label, "error": w.error.splitlines()[-1]})
            continue
        rate = statistics.median(w.rates)
        gflops = flops * rate / TASKS / 1e9 if flops else float("nan")
        rows.append({"label": w.label, "framework": w.hello.get("framework"),
                     "tasks_per_s": rate, "compile_s": w.hello.get("compile_s"),
                     "gflop_per_s": gflops, "percent_of_peak": 100 * gflops / peak,
                     "windows": [round(r, 1) for r in w.rates], "steps_per_window": w.steps})
    rows += [{"label": label, "error": "not installed: pass --peers_python (README.md here)"}
             for label in missing]
    return rows, peak


def _print(config: str, rows: list[dict], peak: float) -> None:
    print(f"\n### {config} (Omniglot 5w1s, Conv-4, meta-batch {TASKS}); matmul peak "
          f"{peak:.0f} GFLOP/s\n")
    best_ours = max((r["tasks_per_s"] for r in rows if r["label"].startswith("maml_tf")
                     and "tasks_per_s" in r), default=float("nan"))
    best_peer = max((r["tasks_per_s"] for r in rows if not r["label"].startswith("maml_tf")
                     and "tasks_per_s" in r), default=float("nan"))
    print("| implementation | tasks/s | GFLOP/s | % of peak | compile s | maml_tf's best / this |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['label']} | {r['error']} | | | | |")
            continue
        print(f"| {r['label']} | {r['tasks_per_s']:.0f} | {r['gflop_per_s']:.0f} | "
              f"{r['percent_of_peak']:.0f}% | {r['compile_s']:.1f} | "
              f"{best_ours / r['tasks_per_s']:.2f}x |")
    print(f"\nmaml_tf's best against the fastest peer: {best_ours / best_peer:.2f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--chunks", default="0,1",
                   help="maml_tf task chunk counts to time (0: chosen, the default of training)")
    p.add_argument("--windows", type=int, default=7)
    p.add_argument("--window_seconds", type=float, default=2.0)
    default_peers = os.environ.get("MAML_TF_PEERS_PYTHON") or os.path.join(HERE, ".venv", "bin", "python")
    p.add_argument("--peers_python", default=default_peers,
                   help="the Python of the environment with JAX and PyTorch")
    a = p.parse_args()
    peers = a.peers_python if os.path.exists(a.peers_python) else None
    info = machine()
    print(f"Machine: {describe(info)}")
    results = {"machine": info, "configs": {}}
    for config in a.configs.split(","):
        rows, peak = compare(config, [int(c) for c in a.chunks.split(",")], peers, a.windows,
                             a.window_seconds)
        _print(config, rows, peak)
        results["configs"][config] = {"rows": rows, "peak_gflops": peak}
    print("\n" + json.dumps(results))


if __name__ == "__main__":
    main()
