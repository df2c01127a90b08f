"""Time per 1,000 meta-training iterations of every flagfile in runs/, with the real data
pipeline, and the input pipeline's own rate (it must not be the bottleneck).

    MAML_TF_DATA_DIR=../shared/data/omniglot \\
    MAML_TF_MINI_IMAGENET_DIR=../shared/data/mini_imagenet_sample \\
    python benchmarks/cells.py [--steps=30] [--cells=runs/omniglot_20w5s.cfg]
        [--precision=mixed_bfloat16]

Each cell runs in its own subprocess; after 3 warm-up iterations (compilation) it times
``--steps`` iterations of the compiled meta-step fed by the tf.data pipeline, then the
pipeline alone for as many meta-batches.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(cfg: str, steps: int, precision: str = "") -> dict:
    from absl import flags
    from maml_tf import data as data_lib
    from maml_tf import api, flags as maml_flags, supervised, train_step as train_step_lib
    extra = [f"--precision={precision}"] if precision else []
    flags.FLAGS(["prog"] + maml_flags.expand_flagfiles([f"--flagfile={cfg}"] + extra))
    config = maml_flags.config_from_flags(flags.FLAGS)
    if config.dataset == "mini_imagenet" and not config.data_dir:
        config = config.replace(data_dir=os.environ.get("MAML_TF_MINI_IMAGENET_DIR", ""))
    run = api.build(config, tempfile.mkdtemp(prefix="cell-"))
    train_step = train_step_lib.make_train_step(run)
    schedule = supervised.Schedule(config)
    # Iteration i scores every inner step's queries where training would (--step_metrics_every
    # and the logged iterations), so the rate is training's own mix of the two programs.
    step = lambda batch, i: train_step(batch, run.learner.first_order_at(i - 1),
                                       schedule.step_metrics(i, run.learner))
    batches = iter(data_lib.train_dataset(config))
    t0 = time.perf_counter()
    for i in range(1, 4):
        float(step(next(batches), i)["loss"])
    if schedule.other_program_follows(run.learner, 3):
        train_step.compile(next(batches), run.learner.first_order_at(2),
                           not schedule.step_metrics(3, run.learner))
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(4, 4 + steps):
        out = step(next(batches), i)
    float(out["loss"])
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        next(batches)
    input_s = time.perf_counter() - t0
    return {"cell": os.path.basename(cfg)[:-4] + (f" ({precision})" if precision else ""),
            "meta_batch": config.meta_batch_size,
            "warmup_s": warmup, "s_per_1000": 1000 * train_s / steps,
            "tasks_per_s": steps * config.meta_batch_size / train_s,
            "input_batches_per_s": steps / input_s, "steps_per_s": steps / train_s}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cells", default="")
    p.add_argument("--precision", default="", help="--precision of the runs (default: the "
                   "flagfile's)")
    p.add_argument("--child", default="")
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.steps, a.precision)))
        return
    cells = a.cells.split(",") if a.cells else [
        os.path.relpath(c, ROOT) for c in sorted(glob.glob(os.path.join(ROOT, "runs", "*.cfg")))
        if not c.endswith("_common.cfg")]
    print("| cell | meta-batch | s / 1,000 it | tasks/s | compile+3 it s | input batches/s vs steps/s |")
    print("|---|---|---|---|---|---|")
    for cell in cells:
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        proc = subprocess.run([sys.executable, __file__, f"--child={cell}", f"--steps={a.steps}",
                               f"--precision={a.precision}"],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode or not lines:
            print(f"| {cell} | failed: {proc.stderr.strip().splitlines()[-1:]} |")
            continue
        r = json.loads(lines[-1])
        print(f"| {r['cell']} | {r['meta_batch']} | {r['s_per_1000']:.0f} | {r['tasks_per_s']:.0f} | "
              f"{r['warmup_s']:.1f} | {r['input_batches_per_s']:.0f} vs {r['steps_per_s']:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
