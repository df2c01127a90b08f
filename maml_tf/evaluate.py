"""Evaluates a run's latest checkpoint on its fixed test tasks; kept short.

    python -m maml_tf.evaluate --workdir=$HOME/maml_runs/omniglot_5w1s [--eval_tasks=600]

Reads the run's config.json (a user's ``--model=module:function`` is rebuilt from it);
flags given on the command line that change only the evaluation (--eval_tasks,
--eval_inner_steps, --eval_shots, --data_dir) override it.
"""

import os

from absl import app, flags

from maml_tf import cli, train_loop
from maml_tf import flags as maml_flags  # noqa: F401  (defines the flags)

FLAGS = flags.FLAGS
EVAL_OVERRIDES = ("eval_tasks", "eval_inner_steps", "eval_shots", "data_dir", "data_source",
                  "strategy", "jit_compile")


def main(argv):
    del argv
    if not os.path.exists(os.path.join(FLAGS.workdir or "", "config.json")):
        raise SystemExit(f"--workdir={FLAGS.workdir!r} holds no config.json: pass the "
                         "workdir of a run started with maml_tf.train.")
    overrides = {k: FLAGS[k].value for k in EVAL_OVERRIDES if FLAGS[k].present}
    with cli.user_errors(verbose=FLAGS.verbosity >= 1):
        train_loop.evaluate_workdir(FLAGS.workdir, **overrides)


if __name__ == "__main__":
    app.run(main)
