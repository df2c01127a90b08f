"""Runs a grid of experiments, each at one or more seeds; kept short.

    python -m maml_tf.sweep --flagfile=runs/omniglot_5w1s.cfg --workdir=$HOME/maml_runs/lr \\
        --grid=algorithm=maml,protonet,r2d2 --grid=inner_lr=0.1,0.4 --seeds=3 [--jobs=2]

Every run is ``python -m maml_tf.train`` with the command's flags, the grid point's values
and its seed, in ``WORKDIR/<key>=<value>,.../seed-K/`` (its output in ``WORKDIR/logs/``).
Running the same command again skips the finished runs and resumes a stopped one; a failed
run is reported and the others go on. ``python -m maml_tf.report WORKDIR`` gives one row per
grid point (the mean over its seeds ± the 95% CI over seeds), ``tensorboard
--logdir=WORKDIR`` the HParams dashboard of every run.
"""

from absl import app, flags

from maml_tf import cli, grid
from maml_tf import flags as maml_flags

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(maml_flags)


def main(argv):
    cli.no_positional(argv)
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required: the directory that holds the runs.")
    with cli.user_errors(verbose=FLAGS.verbosity >= 1):
        config = maml_flags.config_from_flags(FLAGS)
        axes = grid.parse_grid(FLAGS.grid)
        if not axes and not FLAGS.seeds:
            raise cli.ConfigError("Give --grid=key=v1,v2,... (repeat for more axes) and/or "
                                  "--seeds=N: a sweep of one run is python -m maml_tf.train.")
        if FLAGS.jobs < 1:
            raise cli.ConfigError(f"--jobs={FLAGS.jobs} is invalid: it must be >= 1.")
        cli.run_group(FLAGS, config, FLAGS.workdir, axes, FLAGS.seeds, FLAGS.jobs)


if __name__ == "__main__":
    app.run(main, argv=cli.argv(FLAGS))
