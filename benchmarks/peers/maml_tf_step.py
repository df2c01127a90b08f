"""maml_tf's own train step (``train_step.make_train_step``: the learner, XLA, task chunks,
the outer Adam) on the comparison's episode; started by ``compare.py``. Also reports the
step's counted matmul FLOPs (``benchmarks/meta_step.py``), which every peer shares: they
compute the same meta-gradient."""

import os
import sys
import tempfile
import time

import tensorflow as tf

import _protocol as P

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import meta_step  # noqa: E402  (benchmarks/meta_step.py: the FLOP count)


def main():
    from maml_tf import api, train_step as train_step_lib
    from maml_tf.config import Config
    from maml_tf.data.episode import Episode
    name, chunks = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1
    config = P.CONFIGS[name]
    cfg = Config.from_dict(dict(
        dataset="omniglot", way=P.WAY, shot=P.SHOT, query=P.QUERY, meta_batch_size=P.TASKS,
        inner_lr=P.INNER_LR, meta_lr=P.META_LR, inner_steps=config["inner_steps"],
        algorithm="fomaml" if config["first_order"] else "maml", task_chunks=chunks))
    run = api.build(cfg, tempfile.mkdtemp(prefix="compare-"))
    sx, sy, qx, qy = (tf.constant(a) for a in P.episode())
    episode = Episode(sx, sy, qx, qy, tf.tile(tf.range(P.WAY)[None], [P.TASKS, 1]))
    # The meta-gradient and update only, as every peer computes it (training adds the
    # per-step query metrics on one meta-step in --step_metrics_every).
    train_step = train_step_lib.make_train_step(run)
    step = lambda ep: train_step(ep, step_metrics=False)
    t0 = time.perf_counter()
    float(step(episode)["loss"])
    compile_s = time.perf_counter() - t0
    flops = meta_step._counted_flops(run.learner, episode, cfg.inner_steps, cfg.first_order)
    used = run.config.task_chunks    # the count chosen where --task_chunks=0 (auto)
    P.reply(ready=True, compile_s=compile_s, flops_per_step=flops, task_chunks=used,
            framework=f"maml_tf ({used} task chunk{'s' if used > 1 else ''})")
    matmul = tf.function(lambda a: a @ a, jit_compile=True)
    P.serve(lambda: step(episode), lambda out: float(out["loss"]),
            lambda: P.time_matmul(lambda n: matmul(tf.ones((n, n))), lambda v: v.numpy()))


if __name__ == "__main__":
    main()
