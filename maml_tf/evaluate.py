"""Evaluates a run's latest checkpoint on its fixed test tasks; kept short.

    python -m maml_tf.evaluate --workdir=$HOME/maml_runs/omniglot_5w1s [--eval_tasks=600]

Reads the run's config.json (a user's ``--model=module:function`` is rebuilt from it);
flags given on the command line that change only the evaluation (--eval_tasks,
--eval_inner_steps, --eval_shots, --eval_seed, --data_dir, ...) override it for this
evaluation only. Writes ``results-<protocol>.json`` beside the run's own results.json, which
it never changes, and TensorBoard values under ``eval/<protocol>/``.
"""

import os

from absl import app, flags

from maml_tf import api, cli
from maml_tf import config as C
from maml_tf import flags as maml_flags

FLAGS = flags.FLAGS
# --help lists the project's flags, not only "Try --helpfull".
flags.adopt_module_key_flags(maml_flags)


def main(argv):
    cli.no_positional(argv)
    if not os.path.exists(os.path.join(FLAGS.workdir or "", "config.json")):
        raise SystemExit(f"--workdir={FLAGS.workdir!r} holds no config.json: pass the "
                         "workdir of a run started with maml_tf.train.")
    # Every run flag given is passed on: one that evaluation cannot honour (--inner_lr) is
    # refused by name instead of being silently ignored.
    overrides = {k: FLAGS[k].value for k in C.OWNER if FLAGS[k].present}
    with cli.user_errors(verbose=FLAGS.verbosity >= 1, leave_process=True):
        command = [k for k in maml_flags.COMMAND_FLAGS if k != "workdir" and FLAGS[k].present]
        if command:
            raise C.ConfigError(f"--{command[0]} is a flag of training runs, not of an "
                                "evaluation: drop it.")
        api.evaluate_workdir(FLAGS.workdir, verbose=None, **overrides)


if __name__ == "__main__":
    app.run(main, argv=cli.argv(FLAGS, only=("workdir",) + api.EVAL_OVERRIDES))
