"""Exports a meta-trained run for use outside maml_tf; kept short.

    python -m maml_tf.export --workdir=$HOME/maml_runs/omniglot_5w1s --format=saved_model \\
        --out=$HOME/served/omniglot_5w1s [--shot=5] [--eval_queries=1]
    python -m maml_tf.export --workdir=$HOME/maml_runs/omniglot_5w1s --format=keras \\
        --out=$HOME/omniglot_5w1s.keras

saved_model: a SavedModel (TensorFlow only, no maml_tf needed) whose serving signature
adapt_and_predict(support_x, support_y, query_x) -> {logits, probabilities} adapts to each
task's support set as the run's evaluation does and predicts its queries; --shot,
--eval_queries, --eval_mode and --eval_inner_steps change the served shapes and protocol
from the run's. keras: the network at its meta-learned weights (the initialisation to
fine-tune from) in standard Keras layers. See "Using a meta-trained model" in the README.
"""

from absl import app, flags

from maml_tf import cli, serving
from maml_tf import flags as maml_flags

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(maml_flags)

# Run flags that change what the SavedModel serves, and the option each sets.
_SERVED = {"shot": "shot", "eval_queries": "queries", "eval_mode": "mode",
           "eval_inner_steps": "steps"}


def main(argv):
    cli.no_positional(argv)
    with cli.user_errors(verbose=FLAGS.verbosity >= 1):
        if not FLAGS.workdir or not FLAGS.out:
            raise serving.ConfigError("Name the run and the output: --workdir=<a run's workdir> "
                                      "--out=<new .keras file or SavedModel folder>.")
        options = {option: FLAGS[name].value for name, option in _SERVED.items()
                   if FLAGS[name].present}
        if options and FLAGS.format == "keras":
            raise serving.ConfigError(f"--{next(n for n, o in _SERVED.items() if o in options)} "
                                      "sets what a SavedModel serves; --format=keras exports "
                                      "only the network's weights: drop it.")
        serving.export(FLAGS.workdir, FLAGS.format, FLAGS.out, FLAGS.checkpoint, **options)
        print(f"Exported {FLAGS.workdir} as {FLAGS.format} to {FLAGS.out}")


if __name__ == "__main__":
    app.run(main, argv=cli.argv(FLAGS, only=("workdir",) + maml_flags.EXPORT_FLAGS +
                                tuple(_SERVED)))
