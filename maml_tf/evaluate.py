"""Evaluates a run's latest checkpoint on its fixed test tasks; kept short.

    python -m maml_tf.evaluate --workdir=$HOME/maml_runs/omniglot_5w1s [--eval_tasks=600]

Reads the run's config.json; flags given on the command line that change only the
evaluation (--eval_tasks, --eval_inner_steps, --eval_shots, --data_dir) override it.
"""

import json
import os

from absl import app, flags

from maml_tf import flags as maml_flags  # noqa: F401  (defines the flags)
from maml_tf import checkpointing, evaluation, train_loop
from maml_tf.config import Config

FLAGS = flags.FLAGS
EVAL_OVERRIDES = ("eval_tasks", "eval_inner_steps", "eval_shots", "data_dir", "data_source",
                  "strategy", "jit_compile")


def main(argv):
    del argv
    path = os.path.join(FLAGS.workdir or "", "config.json")
    if not os.path.exists(path):
        raise SystemExit(f"--workdir={FLAGS.workdir!r} holds no config.json: pass the "
                         "workdir of a run started with maml_tf.train.")
    with open(path) as f:
        values = json.load(f)
    values.update({k: FLAGS[k].value for k in EVAL_OVERRIDES if FLAGS[k].present})
    config = Config.from_dict(values)
    r = train_loop.build(config, FLAGS.workdir, overwrite=False)
    if checkpointing.restore_or_init(r.manager) is None:
        raise SystemExit(f"No checkpoint in {FLAGS.workdir}/checkpoints to evaluate.")
    step = evaluation.make_eval_step(r.learner, config.test_inner_steps, r.strategy,
                                     config.jit_compile)
    train_loop.final_evaluation(r, step)


if __name__ == "__main__":
    app.run(main)
