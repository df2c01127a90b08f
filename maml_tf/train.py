"""Meta-training entry point; intentionally kept short.

    python -m maml_tf.train --flagfile=runs/sinusoid.cfg --workdir=$HOME/maml_runs/sinusoid

Turns flags into a ``Config`` and calls ``api.train``. Re-running the same command
resumes from the workdir's latest checkpoint. ``--seeds=3`` (or ``--seeds=0,1,2``) runs the
experiment once per seed in ``WORKDIR/seed-K/``, one after the other (``maml_tf.grid``).
"""

import os
import sys

from absl import app, flags

from maml_tf import api, cli, distribute
from maml_tf import flags as maml_flags

FLAGS = flags.FLAGS
# --help lists the project's flags, not only "Try --helpfull".
flags.adopt_module_key_flags(maml_flags)


def main(argv):
    cli.no_positional(argv)
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required: the directory that holds this run.")
    with cli.user_errors(verbose=FLAGS.verbosity >= 1, leave_process=True):
        config = maml_flags.config_from_flags(FLAGS)
        if config.strategy == "multi_worker" and not FLAGS.seeds and \
                distribute.STARTED_FD not in os.environ:
            raise SystemExit(cli.supervised_worker(["maml_tf.train", *sys.argv[1:]]))
        if FLAGS.grid or FLAGS["jobs"].present:
            raise cli.ConfigError("--grid and --jobs are flags of python -m maml_tf.sweep, "
                                  "which runs a grid of experiments; this command runs one.")
        if FLAGS.seeds:
            cli.run_group(FLAGS, config, FLAGS.workdir, axes=[], seeds=FLAGS.seeds, jobs=1)
        api.train(config, FLAGS.workdir, overwrite=FLAGS.overwrite, verbose=None)
    if config.strategy == "multi_worker":
        # Every worker has passed the final barrier: leave at once, before TensorFlow's
        # coordination service logs the first worker to go as a crashed task.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    app.run(main, argv=cli.argv(FLAGS, only=[n for n in FLAGS if n not in ("grid", "jobs")]))
