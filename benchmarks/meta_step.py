"""Meta-step benchmark: throughput, compile time, peak RSS, counted GFLOP/s and its share of
the machine's measured matmul peak, and the ratio to a plain per-task loop, for the paper's
configurations. Prints the machine first (CPU model, cores, AVX2 / AVX-512 / AMX).

    python benchmarks/meta_step.py                       # every case, second and first order
    python benchmarks/meta_step.py --cases=omniglot_5w1s --orders=second
    python benchmarks/meta_step.py --memory              # peak RSS vs inner steps (+ recompute, chunks)
    python benchmarks/meta_step.py --memory --memory_variants=plain,imaml   # iMAML's flat memory
    python benchmarks/meta_step.py --task_chunks=4       # meta-gradient in 4 sequential task chunks
    python benchmarks/meta_step.py --algorithms=maml,reptile,protonet   # runs/omniglot_5w1s_*.cfg
    python benchmarks/meta_step.py --models=conv4,keras_conv4 --cases=omniglot_5w1s --orders=second

Each case runs in its own subprocess, so compile time and peak RSS are its own. GFLOP counts
the matmuls of the optimized XLA program (see ``_counted_flops``). Episodes
are synthetic tensors of the real shapes: this measures the meta-step, not the input
pipeline (``--input`` measures that on the real Omniglot arrays). Throughput is the
median over ``--windows`` windows of ``--window_steps`` meta-steps after one warm-up window.
Nothing here is run by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import machine  # benchmarks/machine.py

CASES = {
    "omniglot_5w1s": dict(dataset="omniglot", way=5, shot=1, inner_steps=1, inner_lr=0.4,
                          meta_batch_size=32),
    "omniglot_20w1s": dict(dataset="omniglot", way=20, shot=1, inner_steps=5, inner_lr=0.1,
                           meta_batch_size=16),
    "omniglot_20w5s": dict(dataset="omniglot", way=20, shot=5, inner_steps=5, inner_lr=0.1,
                           meta_batch_size=16),
    "mini_imagenet_5w1s": dict(dataset="mini_imagenet", way=5, shot=1, query=15, inner_steps=5,
                               inner_lr=0.01, meta_batch_size=4, grad_clip=10.0),
}


# -- child: one measurement ------------------------------------------------------------------
def _episode(config):
    import numpy as np
    import tensorflow as tf
    from maml_tf.data.episode import Episode
    rng = np.random.default_rng(0)
    t, ns, nq = config.meta_batch_size, config.way * config.shot, config.way * config.queries
    img = lambda n: tf.constant(rng.uniform(size=(t, n) + config.image_shape).astype("float32"))
    lab = lambda n: tf.constant(rng.integers(0, config.way, size=(t, n)).astype("int32"))
    classes = np.stack([rng.permutation(100)[:config.way] for _ in range(t)]).astype("int32")
    return Episode(img(ns), lab(ns), img(nq), lab(nq), tf.constant(classes))


def _measure(config, windows: int, window_steps: int, step_metrics: bool = False):
    """Builds the run's train step; returns (run, episode, step, compile s, steps/s), the
    rate being the median of ``windows`` after one warm-up window.

    ``step_metrics=False`` times the step as meta-training runs it on all but one meta-step
    in ``--step_metrics_every``: the queries scored after the last inner step only, as every
    peer computes it; True, the step that also scores them after every inner step."""
    from maml_tf import api, train_step as train_step_lib
    run = api.build(config, tempfile.mkdtemp(prefix="bench-"))
    episode = _episode(config)
    train_step = train_step_lib.make_train_step(run)
    step = lambda ep: train_step(ep, step_metrics=step_metrics)
    t0 = time.perf_counter()
    float(step(episode)["loss"])
    compile_s = time.perf_counter() - t0
    _time_windows(step, episode, 1, window_steps)   # warm-up window
    return run, episode, step, compile_s, _time_windows(step, episode, windows, window_steps)


def _time_windows(fn, episode, windows, steps):
    rates = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(steps):
            out = fn(episode)
        float(out["loss"] if isinstance(out, dict) else out)   # wait for the last step
        rates.append(steps / (time.perf_counter() - t0))
    return statistics.median(rates)


_SHAPE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\w+\[([\d,]*)\]")


def _counted_flops(learner, episode, steps, first_order):
    """Matmul FLOPs of the meta-gradient as XLA will run it: 2*M*N*K summed over the
    ``dot`` and ``convolution`` instructions of the optimized HLO (dead branches already
    pruned; elementwise work not counted)."""
    import numpy as np
    import tensorflow as tf

    @tf.function(jit_compile=True)
    def meta_grad(weights, ep):
        with tf.GradientTape() as tape:
            tape.watch(weights)
            loss, _ = learner.meta_loss(weights, ep, steps, first_order)
        return tape.gradient(loss, weights)

    weights = [tf.identity(w) for w in learner.meta_weights()]
    hlo = meta_grad.experimental_get_compiler_ir(weights, episode)(stage="optimized_hlo")
    shapes = {m.group(1): [int(d) for d in m.group(2).split(",") if d]
              for m in map(_SHAPE.match, hlo.splitlines()) if m}
    total = 0
    for line in hlo.splitlines():
        if " dot(" in line:   # k: the product of the lhs's contracting dimensions
            lhs = re.search(r"dot\(%?([\w.\-]+)", line).group(1)
            dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line).group(1)
            k = int(np.prod([shapes[lhs][int(i)] for i in dims.split(",") if i]))
        elif " convolution(" in line:
            # Stride-1 convolutions run natively (models/layers.py): each output element is
            # a dot of (window size x the kernel's input features), as im2col's matmul.
            rhs = re.search(r"convolution\(%?[\w.\-]+,\s*%?([\w.\-]+)", line).group(1)
            window = re.search(r"size=([\dx]+)", line).group(1)
            rhs_labels = re.search(r"dim_labels=\w+_(\w+)->", line).group(1)
            k = int(np.prod([int(d) for d in window.split("x")])) * \
                shapes[rhs][rhs_labels.index("i")]
        else:
            continue
        total += 2 * int(np.prod(shapes[_SHAPE.match(line).group(1)])) * k
    return total


def _loop_step(run, steps, first_order):
    """The baseline: the same meta-gradient, one task at a time, in a tf.function loop."""
    import tensorflow as tf
    from maml_tf.data.episode import Episode
    learner, variables = run.learner, run.learner.meta_variables

    @tf.function
    def step(ep):
        with tf.GradientTape() as tape:
            losses = []
            for t in range(ep.support_x.shape[0]):
                task = Episode(*(x[t:t + 1] for x in ep[:4]))
                losses.append(learner.meta_loss(learner.meta_weights(), task, steps,
                                                first_order, track_steps=False)[0])
            loss = tf.add_n(losses) / len(losses)
        run.optimizer.apply(tape.gradient(loss, learner.meta_weights()), variables)
        return loss

    return step


# --models: the zoo's networks by name, a user's standard-Keras one by file:function.
MODELS = {"conv4": "auto", "resnet12": "resnet12",
          "keras_conv4": os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                      "keras_conv4.py:conv4")}


def child(case: str, order: str, windows: int, window_steps: int, inner_steps: int | None,
          recompute: bool, loop: bool, jit: bool = True, task_chunks: int = 1,
          model: str = "conv4", meta_batch: int | None = None, step_metrics: bool = False,
          precision: str = "float32") -> dict:
    from maml_tf.config import Config
    algorithm = {"first": "fomaml", "second": "maml", "imaml": "imaml"}[order]
    values = dict(CASES[case], algorithm=algorithm,
                  inner_recompute=recompute, jit_compile=jit, task_chunks=task_chunks,
                  model=MODELS[model], precision=precision)
    if inner_steps is not None:
        values["inner_steps"] = inner_steps
    if meta_batch is not None:
        values["meta_batch_size"] = meta_batch
    config = Config.from_dict(values)
    run, episode, step, compile_s, steps_per_s = _measure(config, windows, window_steps,
                                                          step_metrics)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # iMAML's step is not the meta-loss's gradient: its matmuls are not counted.
    # --precision=mixed_bfloat16 does float32's work: count float32's program (under XLA its
    # per-task convolution gradients lower with dilated inputs, whose zeros would count too).
    kernel_dtype, run.learner.kernel_dtype = run.learner.kernel_dtype, None
    flops = (float("nan") if algorithm == "imaml" else
             _counted_flops(run.learner, episode, config.inner_steps, config.first_order))
    run.learner.kernel_dtype = kernel_dtype
    out = {"case": case, "order": order, "inner_steps": config.inner_steps, "jit": jit,
           "model": model, "precision": precision,
           "task_chunks": task_chunks, "step_metrics": step_metrics,
           "recompute": recompute, "meta_batch": config.meta_batch_size,
           "tasks_per_s": steps_per_s * config.meta_batch_size, "compile_s": compile_s,
           "peak_rss_mb": rss_mb, "gflop_per_step": flops / 1e9,
           "gflop_per_s": flops * steps_per_s / 1e9}
    if loop:
        loop_step = _loop_step(run, config.inner_steps, config.first_order)
        float(loop_step(episode))
        loop_rate = _time_windows(loop_step, episode, max(3, windows // 2), max(2, window_steps // 4))
        out["loop_tasks_per_s"] = loop_rate * config.meta_batch_size
        out["speedup_vs_loop"] = steps_per_s / loop_rate
    return out


def algorithm_child(algorithm: str, windows: int, window_steps: int) -> dict:
    """The train step of ``runs/omniglot_5w1s_<algorithm>.cfg`` exactly as configured there."""
    from absl import flags
    from maml_tf import flags as maml_flags
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = os.path.join(root, "runs", "omniglot_5w1s" + ("" if algorithm == "maml" else f"_{algorithm}") + ".cfg")
    os.chdir(root)
    flags.FLAGS(["bench"] + maml_flags.expand_flagfiles([f"--flagfile={cfg}"]))
    data_dir = os.environ.get("MAML_TF_DATA_DIR") or os.path.join(root, "..", "shared", "data", "omniglot")
    config = maml_flags.config_from_flags(flags.FLAGS).replace(data_dir=data_dir)
    _, _, _, compile_s, steps_per_s = _measure(config, windows, window_steps)
    from maml_tf.algorithms import train_inner_steps
    return {"algorithm": algorithm, "meta_batch": config.meta_batch_size,
            "inner_steps": train_inner_steps(config), "tasks_per_s": steps_per_s * config.meta_batch_size,
            "compile_s": compile_s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _print_algorithms(rows):
    print("| algorithm | meta-batch | inner steps (train) | tasks/s | compile s | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['algorithm']} | {r['meta_batch']} | {r['inner_steps']} | "
              f"{r['tasks_per_s']:.0f} | {r['compile_s']:.1f} | {r['peak_rss_mb']:.0f} |")


# -- parent: run the children, print the table --------------------------------------------------
def _spawn(args: list[str]) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, __file__, "--child"] + args, env=env,
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == -9 and not lines:
        # The kernel's OOM killer: a configuration that does not fit is a result too.
        print(f"benchmark child {args} was killed (SIGKILL: out of memory?)", file=sys.stderr)
        keys = dict(a[2:].split("=", 1) for a in args if "=" in a)
        return {"case": keys.get("case", "?"), "model": keys.get("model", "conv4"),
                "order": keys.get("order", "?"), "task_chunks": keys.get("task_chunks", "?"),
                "killed": True}
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def _print_speed(rows, peak):
    print("| case | model | order | chunks | tasks/s | compile s | peak RSS MB | GFLOP/step | "
          "GFLOP/s | % of peak | loop tasks/s | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("killed"):
            print(f"| {r['case']} | {r['model']} | {r['order']} | {r['task_chunks']} | "
                  "killed: out of memory | | | | | | | |")
            continue
        print(f"| {r['case']} | {r['model']} | {r['order']} | {r['task_chunks']} | "
              f"{r['tasks_per_s']:.3g} | {r['compile_s']:.1f} | "
              f"{r['peak_rss_mb']:.0f} | {r['gflop_per_step']:.2f} | {r['gflop_per_s']:.1f} | "
              f"{100 * r['gflop_per_s'] / peak:.0f}% | {r.get('loop_tasks_per_s', float('nan')):.0f} | "
              f"{r.get('speedup_vs_loop', float('nan')):.2f}x |")


def _print_memory(rows):
    print("| algorithm | inner steps | XLA | recompute | task chunks | peak RSS MB | tasks/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        name = "iMAML" if r["order"] == "imaml" else "MAML"
        print(f"| {name} | {r['inner_steps']} | {r['jit']} | {r['recompute']} | {r['task_chunks']} | "
              f"{r['peak_rss_mb']:.0f} | {r['tasks_per_s']:.0f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--orders", default="second,first")
    p.add_argument("--windows", type=int, default=7)
    p.add_argument("--window_steps", type=int, default=10)
    p.add_argument("--memory", action="store_true", help="peak RSS at 1/5/10/20 inner steps")
    p.add_argument("--memory_case", default="omniglot_5w1s")
    p.add_argument("--memory_steps", default="1,5,10,20", help="with --memory: inner steps")
    p.add_argument("--memory_variants", default="plain,recompute,chunks",
                   help="with --memory: plain, recompute (--inner_recompute), chunks (4 task "
                   "chunks), imaml (iMAML's implicit meta-gradient, 5 CG steps)")
    p.add_argument("--no_loop", action="store_true", help="skip the per-task loop baseline")
    p.add_argument("--algorithms", help="comma-separated algorithms: time the train step of "
                   "each runs/omniglot_5w1s_<algorithm>.cfg (maml: omniglot_5w1s.cfg)")
    p.add_argument("--models", default="conv4", help="comma-separated networks: conv4 (the "
                   "zoo's), keras_conv4 (the same in standard keras.layers), resnet12")
    p.add_argument("--meta_batch", type=int, help="override the case's meta-batch size")
    p.add_argument("--algorithm", help=argparse.SUPPRESS)
    p.add_argument("--model", default="conv4", help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--peak", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--order", default="second", help=argparse.SUPPRESS)
    p.add_argument("--inner_steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--recompute", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no_jit", action="store_true", help="meta-step without XLA")
    p.add_argument("--precision", default="float32", help="the inner loop's and forward "
                   "passes' compute dtype (--precision of a run): float32, bfloat16, float16, "
                   "mixed_bfloat16")
    p.add_argument("--step_metrics", action="store_true",
                   help="time the meta-step that also scores the queries after every inner "
                        "step (training runs it on one meta-step in --step_metrics_every); "
                        "default: the one that scores the last step only, as the peers do")
    p.add_argument("--task_chunks", type=int, default=1,
                   help="compute each meta-gradient in this many sequential chunks of tasks")
    a = p.parse_args()
    common = [f"--windows={a.windows}", f"--window_steps={a.window_steps}",
              f"--task_chunks={a.task_chunks}"] + (
        ["--step_metrics"] if a.step_metrics else []) + (
        [f"--meta_batch={a.meta_batch}"] if a.meta_batch else []) + (
        [f"--inner_steps={a.inner_steps}"] if a.inner_steps else []) + (
        ["--no_jit"] if a.no_jit else []) + [f"--precision={a.precision}"]
    peak_dtype = "bfloat16" if a.precision == "mixed_bfloat16" else "float32"
    if a.child and a.peak:
        print(json.dumps({"gflops": machine.tf_matmul_peak(dtype=peak_dtype)}))
        return
    if not a.child:
        print(f"Machine: {machine.describe(machine.machine())}", flush=True)
    if a.child and a.algorithm:
        print(json.dumps(algorithm_child(a.algorithm, a.windows, a.window_steps)))
        return
    if a.algorithms:
        rows = [_spawn([f"--algorithm={name}", f"--windows={a.windows}",
                        f"--window_steps={a.window_steps}"]) for name in a.algorithms.split(",")]
        _print_algorithms(rows)
        return
    if a.child:
        print(json.dumps(child(a.case, a.order, a.windows, a.window_steps, a.inner_steps,
                               a.recompute, loop=not a.no_loop, jit=not a.no_jit,
                               task_chunks=a.task_chunks, model=a.model,
                               meta_batch=a.meta_batch, step_metrics=a.step_metrics,
                               precision=a.precision)))
        return
    if a.memory:
        variants = {"plain": [], "recompute": ["--recompute"], "chunks": ["--task_chunks=4"],
                    "imaml": ["--order=imaml"]}
        rows = []
        for s in [int(v) for v in a.memory_steps.split(",")]:
            for v in a.memory_variants.split(","):
                rows.append(_spawn([f"--case={a.memory_case}", f"--inner_steps={s}", "--no_loop",
                                    "--windows=3", "--window_steps=3"] + variants[v] +
                                   (["--no_jit"] if a.no_jit else [])))
                print(json.dumps(rows[-1]), flush=True)     # each row as soon as it is measured
        _print_memory(rows)
        return
    peak = _spawn(["--peak", f"--precision={a.precision}"])["gflops"]
    print(f"{peak_dtype} matmul peak (TensorFlow, {'XLA' if peak_dtype == 'float32' else 'oneDNN'}"
          f", all threads): {peak:.0f} GFLOP/s", flush=True)
    rows = []
    for case in a.cases.split(","):
        for order in a.orders.split(","):
            for model in a.models.split(","):
                rows.append(_spawn([f"--case={case}", f"--order={order}", f"--model={model}"]
                                   + common + (["--no_loop"] if a.no_loop else [])))
                print(json.dumps(rows[-1]), flush=True)
    _print_speed(rows, peak)


if __name__ == "__main__":
    main()
