"""Meta-training entry point; intentionally kept short.

    python -m maml_tf.train --flagfile=runs/sinusoid.cfg --workdir=$HOME/maml_runs/sinusoid

Turns flags into a ``Config`` and calls ``api.train``. Re-running the same command
resumes from the workdir's latest checkpoint.
"""

from absl import app, flags

from maml_tf import api, cli
from maml_tf import flags as maml_flags

FLAGS = flags.FLAGS
# --help lists the project's flags, not only "Try --helpfull".
flags.adopt_module_key_flags(maml_flags)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required: the directory that holds this run.")
    with cli.user_errors(verbose=FLAGS.verbosity >= 1):
        config = maml_flags.config_from_flags(FLAGS)
        api.train(config, FLAGS.workdir, overwrite=FLAGS.overwrite)


if __name__ == "__main__":
    app.run(main, argv=cli.argv(FLAGS))
