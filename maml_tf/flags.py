"""Every absl flag of the entry points, grouped. Names are the public interface.

Defaults come from ``Config`` so that one place holds them. No logic lives here besides
``config_from_flags``, which copies flag values into a ``Config``, and ``sectioned_help``,
which lists the flags by the ``Config``'s sections for ``--help``.
"""

from __future__ import annotations

import os
import textwrap
from typing import Sequence

from absl import flags

from maml_tf import config as C

_D = C.Config()

# -- run --------------------------------------------------------------------------------
flags.DEFINE_string("workdir", None, "Directory that identifies the run: checkpoints, "
                    "TensorBoard events, flags.cfg and results.json are written here.")
flags.DEFINE_bool("overwrite", False, "Allow reusing a workdir that holds a run with "
                  "different flags; its checkpoints are moved aside, never deleted.")
flags.DEFINE_integer("seed", _D.seed, "Seed of the initial weights and of the training tasks.")
flags.DEFINE_enum("strategy", _D.strategy, C.STRATEGIES, "tf.distribute strategy.")
flags.DEFINE_string("tpu", _D.tpu, "TPU name or grpc:// address for --strategy=tpu.")
flags.DEFINE_integer("cpu_devices", _D.cpu_devices, "Split the CPU into this many logical "
                     "devices (replicas for --strategy=mirrored on a machine without GPUs).")
flags.DEFINE_bool("jit_compile", _D.jit_compile, "Compile the meta-step with XLA.")
flags.DEFINE_enum("on_nan", _D.on_nan, C.ON_NAN, "On a non-finite meta-loss or "
                  "meta-gradient: 'fail' stops naming the step window, 'skip' skips the update.")

# -- data -------------------------------------------------------------------------------
flags.DEFINE_string("dataset", _D.dataset, "Meta-learning problem: sinusoid, omniglot, "
                    "mini_imagenet, navigation_2d, halfcheetah_vel, halfcheetah_dir; or your own "
                    "images: 'folder' (an image folder tree in --data_dir, one folder per class) "
                    "or 'tfds:<name>' (a TFDS image-classification data set, e.g. tfds:cifar100).")
flags.DEFINE_string("data_dir", _D.data_dir, "Where the data lie: Omniglot or mini-ImageNet, the "
                    "image folder of --dataset=folder, or the TFDS data directory; empty reads "
                    "$MAML_TF_DATA_DIR for Omniglot, then the TFDS default.")
flags.DEFINE_enum("data_source", _D.data_source, C.SOURCES, "Omniglot source: 'auto' tries "
                  "npz arrays, then the official zips/folders in --data_dir, then TFDS.")
flags.DEFINE_enum("split", _D.split, C.SPLITS, "Omniglot class split (see data/omniglot.py).")
flags.DEFINE_enum("train_rotations", _D.train_rotations, C.ROTATIONS, "Training classes: "
                  "'augment' makes each k*90 degree rotation a new class (4x); 'auto' does so "
                  "for Omniglot only (also available for folder, TFDS and Python data).")
flags.DEFINE_enum("eval_rotations", _D.eval_rotations, C.ROTATIONS, "The same policy for "
                  "validation and test classes (cbfinn/maml rotates Omniglot's too).")
flags.DEFINE_integer("image_size", _D.image_size, "Folder, TFDS and Python data: images are "
                     "resized to this size squared (0: 84, or the data's own size for arrays "
                     "passed from Python).")
flags.DEFINE_integer("channels", _D.channels, "Folder, TFDS and Python data: 1 (grayscale) or "
                     "3 (RGB); 0: RGB (arrays from Python: their own).")
flags.DEFINE_list("class_split", list(_D.class_split), "Folder, TFDS and Python data: split the "
                  "classes at random into this many train,val,test classes (e.g. 64,16,20), "
                  "the same split for every --seed.")
flags.DEFINE_string("split_file", _D.split_file, "Folder, TFDS and Python data: a JSON file "
                    '{"train": [...], "val": [...], "test": [...]} of class names that decides '
                    "the splits, or a standard split shipped with maml_tf: cifar_fs, fc100, cub, "
                    "tiered_imagenet (data/splits/).")
flags.DEFINE_string("label_key", _D.label_key, "TFDS and tf.data dict elements: the feature "
                    "that names the class.")
flags.DEFINE_bool("invert_images", _D.invert_images, "Folder, TFDS and Python data: store "
                  "255 - pixel (dark strokes on white paper become high values, as the Omniglot "
                  "loader stores them).")
flags.DEFINE_bool("crop_to_boxes", _D.crop_to_boxes, "--dataset=folder on CUB-200-2011: crop "
                  "each image to its bounding box (images.txt and bounding_boxes.txt of the "
                  "release, in --data_dir or its parent) before resizing.")
flags.DEFINE_bool("strict_data", _D.strict_data, "Refuse an unreadable image file instead of "
                  "skipping it with a warning.")
flags.DEFINE_string("cache_dir", _D.cache_dir, "Where folder and TFDS data are decoded once "
                    "(read back row by row when large); empty: $MAML_TF_CACHE/data, default "
                    "~/.cache/maml_tf/data.")
flags.DEFINE_integer("way", _D.way, "Classes per task (N).")
flags.DEFINE_integer("shot", _D.shot, "Support examples per class (K), or support points "
                     "per sinusoid task.")
flags.DEFINE_integer("query", _D.query, "Query examples per class (0: same as shot), or "
                     "query points per sinusoid task (0: 10).")
flags.DEFINE_integer("eval_queries", _D.eval_queries, "Query examples per class (points per "
                     "sinusoid task) of the validation and test tasks (0: the same as --query).")
flags.DEFINE_enum("eval_mode", _D.eval_mode, C.EVAL_MODES, "How evaluation normalises the "
                  "queries: 'transductive' (batch statistics of all of a task's queries, the "
                  "paper's protocol), 'support' (the adapted network's statistics on the "
                  "task's support set) or 'per_example' (each query predicted alone).")
flags.DEFINE_list("eval_shots", list(_D.eval_shots), "Shots to evaluate at (default: --shot).")

# -- model and algorithm -----------------------------------------------------------------
flags.DEFINE_string("model", _D.model, "Network: 'auto' is the paper's choice for the data "
                    "set (MLP 40-40 for sinusoid, Conv-4 for images), 'mlp', 'conv4', or your "
                    "own: 'package.module:function' or 'path/to/file.py:function', where "
                    "function(input_shape, num_outputs) returns a keras.Model.")
flags.DEFINE_bool("allow_inexact", _D.allow_inexact, "Accept (with a warning) a model holding "
                  "a layer whose second derivative maml_tf does not know to be exact; without "
                  "it, second-order algorithms refuse such a model.")
flags.DEFINE_integer("num_filters", _D.num_filters, "Conv-4 filters (0: 64 Omniglot, 32 mini-ImageNet).")
flags.DEFINE_enum("conv_pool", _D.conv_pool, C.POOLS, "Conv-4 downsampling: stride-2 convs "
                  "or 2x2 max-pool ('auto': stride for Omniglot, max for mini-ImageNet).")
flags.DEFINE_enum("norm", _D.norm, C.NORMS, "Conv-4 normalisation: 'batch' uses each task's "
                  "batch statistics (transductive, as the paper); 'layer' normalises each "
                  "example alone (non-transductive); 'none'.")
flags.DEFINE_enum("algorithm", _D.algorithm, C.ALGORITHMS, "Meta-learning algorithm.")
flags.DEFINE_integer("inner_steps", _D.inner_steps, "Inner SGD steps in meta-training.")
flags.DEFINE_enum("inner_optimizer", _D.inner_optimizer, C.INNER_OPTIMIZERS, "Inner-loop "
                  "optimizer: 'sgd', or 'adam' (beta1 = 0, Reptile only).")
flags.DEFINE_bool("inner_recompute", _D.inner_recompute, "Gradient checkpointing of the "
                  "inner loop: recompute each inner step in the backward pass (less memory).")
flags.DEFINE_enum("precision", _D.precision, C.PRECISIONS, "Compute dtype of the inner loop "
                  "and forward passes; meta-weights and losses stay float32. bfloat16 suits "
                  "TPUs and recent GPUs; float16 has no loss scaling (watch for non-finite steps). "
                  "mixed_bfloat16: only convolutions and matmuls in bfloat16, through "
                  "TensorFlow's oneDNN kernels (for CPUs with AMX or AVX-512 BF16), the rest "
                  "float32 under XLA layer by layer.")
flags.DEFINE_integer("eval_inner_steps", _D.eval_inner_steps, "Inner steps at evaluation (0: inner_steps).")
flags.DEFINE_float("inner_lr", _D.inner_lr, "Inner-loop SGD step size (alpha).")
flags.DEFINE_float("meta_lr", _D.meta_lr, "Learning rate of the outer loop (beta; Reptile's "
                   "outer step size epsilon with --meta_optimizer=sgd).")
flags.DEFINE_enum("meta_optimizer", _D.meta_optimizer, C.META_OPTIMIZERS, "Outer optimizer. "
                  "'sgd' with Reptile gives its update theta += eps * mean(phi - theta).")
flags.DEFINE_enum("meta_lr_schedule", _D.meta_lr_schedule, C.LR_SCHEDULES, "Outer learning "
                  "rate over --num_iterations: constant, linear to 0 (Reptile's annealing), or "
                  "cosine to --min_meta_lr (MAML++ CA).")
flags.DEFINE_float("min_meta_lr", _D.min_meta_lr, "Floor of the cosine schedule.")

# -- MAML++ switches (Antoniou et al. 2019), with --algorithm=mamlpp ---------------------
flags.DEFINE_bool("lslr", _D.lslr, "Learned inner learning rates per layer (variable) and step.")
flags.DEFINE_bool("bnwb", _D.bnwb, "Per-step normalisation weights and biases, meta-learned "
                  "and not adapted in the inner loop.")
flags.DEFINE_bool("bnrs", _D.bnrs, "Per-step batch-norm running statistics, gathered in "
                  "meta-training and used at evaluation instead of each task's batch statistics.")
flags.DEFINE_integer("msl_iterations", _D.msl_iterations, "Multi-step loss: weight the query "
                     "loss after every inner step, annealed towards the last step over this "
                     "many iterations (0: off).")
flags.DEFINE_integer("da_iterations", _D.da_iterations, "Derivative-order annealing: first-"
                     "order meta-gradients for this many iterations, then second order (0: off).")
# -- the other algorithms' own switches ----------------------------------------------------
flags.DEFINE_integer("context_dim", _D.context_dim, "CAVIA: context parameters per task, "
                     "appended to a vector input (regression) or fed to FiLM (images).")
flags.DEFINE_string("film_layer", _D.film_layer, "CAVIA on images: the layer whose output "
                    "the context modulates by FiLM (empty: the third normalisation layer).")
flags.DEFINE_float("imaml_lambda", _D.imaml_lambda, "iMAML: proximal regularisation lambda.")
flags.DEFINE_integer("cg_steps", _D.cg_steps, "iMAML: conjugate-gradient iterations of the "
                     "implicit meta-gradient.")
flags.DEFINE_float("cg_damping", _D.cg_damping, "iMAML: solve ((1 + this) I + H / (lambda + "
                   "--imaml_lambda_damping)) v = g for the meta-gradient (0: the exact implicit "
                   "gradient; the authors' code uses 1).")
flags.DEFINE_float("imaml_lambda_damping", _D.imaml_lambda_damping, "iMAML: added to lambda "
                   "where it divides the Hessian in the implicit system (0: exact; the "
                   "authors' code uses 10).")
flags.DEFINE_float("svm_c", _D.svm_c, "MetaOptNet: the SVM's C.")
flags.DEFINE_integer("svm_iterations", _D.svm_iterations, "MetaOptNet: interior-point "
                     "iterations of the SVM solver.")
flags.DEFINE_bool("fce", _D.fce, "Matching Networks: full context embeddings (LSTMs).")
flags.DEFINE_integer("fce_steps", _D.fce_steps, "Matching Networks: attention-LSTM steps.")
flags.DEFINE_integer("relation_hidden", _D.relation_hidden, "Relation Networks: units of the "
                     "relation module's hidden dense layer.")
flags.DEFINE_enum("mann_write", _D.mann_write, C.MANN_WRITES, "MANN: what each head writes to "
                  "memory: 'add', a vector of its own (NTM-style), or 'key', the read key (the "
                  "paper's equation).")
# -- reinforcement learning (--dataset=navigation_2d / halfcheetah_vel / halfcheetah_dir) ---
flags.DEFINE_integer("trajectories", _D.trajectories, "RL: trajectories sampled per task "
                     "with each policy in meta-training (pre- and post-update).")
flags.DEFINE_integer("eval_trajectories", _D.eval_trajectories, "RL: trajectories per task "
                     "and inner step at evaluation.")
flags.DEFINE_integer("horizon", _D.horizon, "RL: steps per episode (0: the environment's: "
                     "100 for 2D navigation, 200 for HalfCheetah).")
flags.DEFINE_float("discount", _D.discount, "RL: discount gamma of the returns and GAE.")
flags.DEFINE_float("gae_lambda", _D.gae_lambda, "RL: GAE's lambda (1: Monte-Carlo returns "
                   "minus the linear baseline).")
flags.DEFINE_float("max_kl", _D.max_kl, "RL, --meta_optimizer=trpo: the KL limit of a step.")
flags.DEFINE_integer("trpo_cg_iterations", _D.trpo_cg_iterations, "RL, --meta_optimizer=trpo: "
                     "conjugate-gradient iterations.")
flags.DEFINE_float("eval_later_inner_lr", _D.eval_later_inner_lr, "RL: the step size of test "
                   "inner steps after the first (0: --inner_lr; the paper: 0.05 after 0.1).")
flags.DEFINE_bool("oracle", _D.oracle, "RL: the policy also observes its task (the goal): "
                  "the paper's oracle baseline.")
flags.DEFINE_integer("meta_batch_size", _D.meta_batch_size, "Tasks per meta-update (global, "
                     "over all replicas).")
flags.DEFINE_integer("task_chunks", _D.task_chunks, "Compute each replica's meta-gradient "
                     "in this many sequential chunks of tasks (an XLA while loop): the same "
                     "gradient with less peak memory and, on a CPU, activations that stay in "
                     "cache. 0: chosen from the shapes and the machine (one chunk on GPUs and "
                     "TPUs; on a CPU, chunks whose activations fit a quarter of the L3 cache).")
flags.DEFINE_float("grad_clip", _D.grad_clip, "Clip the meta-gradient to this global norm (0: off).")

# -- schedule and evaluation ---------------------------------------------------------------
flags.DEFINE_integer("num_iterations", _D.num_iterations, "Meta-training iterations.")
flags.DEFINE_integer("eval_tasks", _D.eval_tasks, "Fixed, seeded test tasks for the final evaluation.")
flags.DEFINE_integer("val_tasks", _D.val_tasks, "Fixed validation tasks for the learning curve.")
flags.DEFINE_integer("eval_seed", _D.eval_seed, "Seed of the fixed validation and test tasks.")
flags.DEFINE_string("eval_dataset", _D.eval_dataset, "Cross-domain evaluation (Chen et al. "
                    "2019): take the final test tasks from this data set's test split instead "
                    "(omniglot, mini_imagenet, folder or tfds:<name>), at the network's image "
                    "shape; validation stays on the training data.")
flags.DEFINE_string("eval_data_dir", _D.eval_data_dir, "--data_dir of --eval_dataset.")
flags.DEFINE_string("eval_split_file", _D.eval_split_file, "--split_file of --eval_dataset (a "
                    "folder or TFDS data set), e.g. cub.")
flags.DEFINE_integer("log_every", _D.log_every, "Iterations between console/TensorBoard logs.")
flags.DEFINE_integer("step_metrics_every", _D.step_metrics_every,
                     "Score the queries after every inner step (TensorBoard's query_loss/step_k "
                     "and query_accuracy/step_k) on one meta-step in this many and on each "
                     "logged one; the others score only the last step, which is all the "
                     "meta-gradient needs (the same update, up to 2x faster with 5 inner steps). "
                     "1: every meta-step.")
flags.DEFINE_integer("eval_every", _D.eval_every, "Iterations between validation evaluations.")
flags.DEFINE_integer("stop_when_flat", _D.stop_when_flat, "End meta-training once the validation "
                     "curve has not risen beyond its 95% CI for this many iterations (the "
                     "rule of runs/README.md's long runs: 10000), and evaluate; "
                     "--num_iterations is then the most it trains. The run counts as finished "
                     "(results.json says so); 0: train all --num_iterations.")
flags.DEFINE_integer("checkpoint_every", _D.checkpoint_every, "Iterations between checkpoints.")

# -- groups of runs ------------------------------------------------------------------------
flags.DEFINE_list("seeds", [], "Run the experiment once per seed, each in WORKDIR/seed-K/ "
                  "(resumable as any run), one after the other: a count (--seeds=3: seeds "
                  "--seed, --seed+1, --seed+2) or the seeds themselves (--seeds=0,1,2). "
                  "python -m maml_tf.report WORKDIR shows them as one row: the mean over "
                  "seeds with its 95% CI.")
flags.DEFINE_multi_string("grid", [], "maml_tf.sweep: one axis of the grid, a flag and its "
                          "values: --grid=algorithm=maml,protonet. Repeat for more axes; the "
                          "runs are their product, each in WORKDIR/key=value,.../.")
flags.DEFINE_integer("jobs", 1, "maml_tf.sweep: runs at once (each a process of its own; at "
                     "most the machine's CPU count).")


def config_from_flags(values: flags.FlagValues) -> C.Config:
    """Copies the flags named like ``Config`` fields into a validated ``Config``."""
    return C.Config.from_dict({name: values[name].value for name in C.OWNER})


def expand_flagfiles(argv: list[str], _including: str | None = None,
                     _stack: tuple = ()) -> list[str]:
    """``argv`` with every ``--flagfile=PATH`` replaced by that file's flags, in place (so
    later flags still override it). A flagfile named inside another is looked for beside the
    including file first, then from the current directory, so flagfiles that include others
    work from any directory. Lines starting with ``#`` or ``//`` are comments."""
    out = []
    for arg in argv:
        if not arg.startswith("--flagfile="):
            out.append(arg)
            continue
        name = os.path.expanduser(arg.split("=", 1)[1])
        path = name
        if _including and not os.path.isabs(name):
            beside = os.path.join(os.path.dirname(_including), name)
            path = beside if os.path.exists(beside) else name
        if not os.path.isfile(path):
            where = f" (named in {_including})" if _including else ""
            raise C.ConfigError(f"--flagfile={name}{where}: no such file.")
        path = os.path.abspath(path)
        if path in _stack:
            raise C.ConfigError(f"--flagfile={name} includes itself (through {' -> '.join(_stack)}).")
        with open(path) as f:
            lines = [line.strip() for line in f]
        lines = [line for line in lines if line and not line.startswith(("#", "//"))]
        out.extend(expand_flagfiles(lines, path, _stack + (path,)))
    return out


# Flags of the commands, not of the run's Config.
COMMAND_FLAGS = ("workdir", "overwrite", "seeds", "grid", "jobs")

# -- export (python -m maml_tf.export) --------------------------------------------------
flags.DEFINE_enum("format", "saved_model", ("keras", "saved_model"), "maml_tf.export: "
                  "'keras' writes the network at its meta-learned weights as a .keras file; "
                  "'saved_model' a SavedModel whose adapt_and_predict signature adapts to a "
                  "support set and predicts the queries.")
flags.DEFINE_string("out", None, "maml_tf.export: the .keras file or the SavedModel folder "
                    "to write (new).")
flags.DEFINE_integer("checkpoint", None, "maml_tf.export: the checkpoint step to export "
                     "(ckpt-N); default the newest that loads.")
EXPORT_FLAGS = ("format", "out", "checkpoint")

# -- launch (python -m maml_tf.launch) --------------------------------------------------
flags.DEFINE_integer("workers", 2, "maml_tf.launch: how many workers to start on this machine.")
flags.DEFINE_integer("max_restarts", 3, "maml_tf.launch: how often to restart the whole "
                     "cluster after a lost or preempted worker.")
LAUNCH_FLAGS = ("workers", "max_restarts")


def passed_flags(values: flags.FlagValues, exclude: Sequence[str] = ()) -> list[str]:
    """The run flags given on the command line (flagfiles expanded), as ``--name=value``
    arguments that give a child process the same values; ``exclude``: names left out."""
    names = list(C.OWNER) + ["overwrite"]
    return [values[n].serialize() for n in names if values[n].present and n not in exclude]


def sectioned_help(values: flags.FlagValues, doc: str = "",
                   only: Sequence[str] | None = None) -> str:
    """``--help``: ``doc``, then the flags by the Config's sections (data, network, algorithm,
    optimisation, evaluation, run, reinforcement learning), each with its help and default.
    only: the flags that this entry point takes (None: all)."""
    lines = [doc.strip(), ""] if doc else []
    groups = [("Command", COMMAND_FLAGS), ("Export", EXPORT_FLAGS),
              ("Launch", LAUNCH_FLAGS)] + [(s.TITLE, s.field_names()) for s in C.SECTIONS]
    for title, names in groups:
        shown = [n for n in names if n in values and (only is None or n in only)]
        if not shown:
            continue
        lines.append(f"{title}:")
        for name in shown:
            flag = values[name]
            text = f"--{'[no]' if flag.boolean else ''}{name}: {flag.help}"
            lines += textwrap.wrap(text, 96, initial_indent="  ", subsequent_indent="    ")
            lines.append(f"    (default: {flag.default_as_str})")
        lines.append("")
    lines.append("--flagfile=PATH reads flags from a file (one per line, # comments); "
                 "--helpfull lists absl's own flags too.")
    return "\n".join(lines)
