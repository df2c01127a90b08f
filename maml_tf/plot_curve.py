"""Plots a run's validation curve (``history.json``) to a PNG; kept short. Prints the best
validation and the last iteration where the curve rose beyond the CI of the best before it
(``plots.last_rise``), which says whether a long run has stopped improving (the rule that
``--stop_when_flat`` applies during training).

    python -m maml_tf.plot_curve --workdir=$HOME/maml_runs/omniglot_5w1s --out=curve.png
"""

import json
import os

from absl import app, flags

from maml_tf import plots

flags.DEFINE_string("workdir", None, "Run directory holding history.json.", required=True)
flags.DEFINE_string("out", None, "PNG file to write.", required=True)
flags.DEFINE_string("title", "", "Figure title (default: the workdir's name).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    path = os.path.join(FLAGS.workdir, "history.json")
    if not os.path.exists(path):
        raise SystemExit(f"{path} does not exist: the run has not validated yet.")
    history = json.load(open(path))
    key, higher = plots.curve_metric(history[0])
    steps, means, cis = ([h[k] for h in history] for k in ("step", key, f"{key}_ci95"))
    plots.learning_curve(steps, means, cis,
                         FLAGS.title or os.path.basename(os.path.normpath(FLAGS.workdir)),
                         f"validation {key} (95% CI)", FLAGS.out)
    best = (max if higher else min)(range(len(means)), key=lambda i: means[i])
    rise, flat = plots.flat_for(history)
    print(f"Wrote {FLAGS.out}. Best validation {key}: {means[best]:.4f} ± {cis[best]:.4f} at "
          f"iteration {steps[best]}; the last rise beyond the CI of the best before it was at "
          f"iteration {rise}, {flat:,} iterations before the last validation "
          f"({steps[-1]}).")


if __name__ == "__main__":
    app.run(main)
