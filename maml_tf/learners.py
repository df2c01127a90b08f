"""The meta-learning algorithms, each a short subclass of ``MetaLearner``, and
``build_learner(config, model)`` that ``--algorithm`` names.

=========  ===========================================================================
maml       ``MetaLearner``: second-order MAML (Finn et al. 2017)
fomaml     ``MetaLearner(first_order=True)``: the second-order term dropped
reptile    ``Reptile`` (Nichol et al. 2018): pseudo-gradient towards adapted weights
metasgd    ``MetaSGD`` (Li et al. 2017): a learned step size for every parameter
anil       ``ANIL`` (Raghu et al. 2020): the inner loop adapts the head only
mamlpp     ``MamlPlusPlus`` (Antoniou et al. 2019): LSLR, BNWB, BNRS, MSL, DA (+ CA: a schedule)
protonet   ``ProtoNet`` (Snell et al. 2017): nearest class mean of Conv-4 embeddings
pretrain   ``Pretrain``: one network trained on all training classes, fine-tuned at test
=========  ===========================================================================
"""

from __future__ import annotations

import dataclasses
import types

import keras
import tensorflow as tf

from maml_tf.data.episode import Episode
from maml_tf.meta_learner import MetaLearner, StepMetrics
from maml_tf.models.functional import tile_for_tasks
from maml_tf.models.keras_layers import is_normalization


def _scalar_summaries(prefix: str, values: dict, step: int) -> None:
    for name, value in values.items():
        tf.summary.scalar(f"{prefix}/{name}", value, step=step)


def _safe(name: str) -> str:
    return name.replace("/", "_")


class Reptile(MetaLearner):
    """Reptile (Nichol et al. 2018, batched version).

    Each task takes ``steps`` inner steps on its support set with the inner optimizer
    (``inner_optimizer="adam"`` is the paper's Adam with beta1 = 0). The outer optimizer then
    receives the pseudo-gradient ``theta - mean_t(phi_t)``; plain SGD at rate epsilon gives
    the paper's update ``theta += epsilon * mean_t(phi_t - theta)``, and a linear schedule
    anneals epsilon to 0. No outer tape, no query set in the update: query metrics are
    computed for logging only.
    """

    SECOND_ORDER = False   # no outer tape through the inner loop

    def __init__(self, model, **kwargs):
        super().__init__(model, **{**kwargs, "first_order": True})

    def meta_step(self, weights, episode, steps, iteration=None, first_order=None):
        trajectory = self.inner_loop(weights, episode.support_x, episode.support_y, steps,
                                     first_order=True)
        net_weights, extra = self.split(weights)
        grads = [w - tf.cast(tf.reduce_mean(phi, axis=0), w.dtype)
                 for w, phi in zip(net_weights, trajectory[-1])]
        per_step = self.score(trajectory, episode, extra)
        loss = tf.reduce_mean(per_step.loss[:, -1])   # for logging: no gradient is taken
        return loss, grads + [tf.zeros_like(e) for e in extra], per_step


class MetaSGD(MetaLearner):
    """Meta-SGD (Li et al. 2017): every parameter has its own inner step size (a tensor of
    its shape), initialised to ``inner_lr`` and meta-trained with the weights."""

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self.extra = [tf.Variable(tf.fill(v.shape, tf.constant(self.inner_lr, v.dtype)),
                                  name=f"lr_{_safe(v.path)}") for v in self.net.variables]

    def inner_lr_for(self, index, step, extra, dtype):
        return extra[index]

    def write_summaries(self, step):
        for v, lr in zip(self.net.variables, self.extra):
            tf.summary.histogram(f"metasgd_lr/{_safe(v.path)}", lr, step=step)
            tf.summary.scalar(f"metasgd_lr_mean/{_safe(v.path)}", tf.reduce_mean(lr), step=step)


class ANIL(MetaLearner):
    """ANIL (Raghu et al. 2020): Almost No Inner Loop. The body (every layer before the
    head) is meta-learned but never adapted, so its features are computed once per task;
    only the head runs the inner loop (a second-order MAML of a linear classifier)."""

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self.body, head = self.net.split_head()
        self.head_learner = MetaLearner(head, **kwargs)

    def _features(self, weights, episode: Episode) -> tuple[list, Episode]:
        nb = len(self.body.variables)
        body = tile_for_tasks(weights[:nb], episode.support_x.shape[0])
        embed = lambda x: self.apply_in_compute_dtype(self.body, body, x)
        return body, episode._replace(support_x=embed(episode.support_x),
                                      query_x=embed(episode.query_x))

    def meta_loss(self, weights, episode, steps, first_order=None, track_steps=True,
                  iteration=None):
        _, features = self._features(weights, episode)
        nb = len(self.body.variables)
        return self.head_learner.meta_loss(list(weights[nb:]), features, steps, first_order,
                                           track_steps, iteration)

    def inner_loop(self, weights, x, y, steps, first_order=None):
        """Fast weights of the whole network: the body's are the meta-weights at every step."""
        body, features = self._features(weights, Episode(x, y, x, y))
        nb = len(self.body.variables)
        heads = self.head_learner.inner_loop(list(weights[nb:]), features.support_x, y, steps,
                                             first_order)
        return [body + head for head in heads]


class MamlPlusPlus(MetaLearner):
    """The MAML++ switches (Antoniou et al. 2019) on second-order MAML.

    lslr: a learned inner step size per variable and per step, ``[steps, variables]``.
    bnwb: per-step normalisation scale and offset, ``[steps + 1, C]`` per norm layer; step
      k's forward pass uses row k, and the inner loop does not adapt them.
    bnrs: per-step batch-norm running statistics, ``[steps + 1, C]`` mean and variance per
      batch-norm layer (the non-trainable ``state``): meta-training normalises with batch
      statistics and folds each step's into row k (exponential average, ``BNRS_MOMENTUM``).
      At evaluation the query after k steps is normalised with row k, so a query's
      prediction no longer depends on the other queries; the support set, which is given,
      still adapts with its own batch statistics (with running statistics there, the
      meta-learned step sizes overshoot: measured, a trained episode fell to chance).
    msl_iterations: multi-step loss: the query loss after every step, weighted; the weights
      anneal from uniform to the last step over this many iterations (then the last only).
    da_iterations: first-order meta-gradients before this iteration, second order after.
    The cosine annealing of the outer rate (CA) is ``--meta_lr_schedule=cosine``.
    """

    MIN_WEIGHT = 0.03   # MAML++'s floor of a non-final step's weight, times 1/steps
    BNRS_MOMENTUM = 0.9  # running = 0.9 * running + 0.1 * batch (PyTorch's momentum 0.1)

    def __init__(self, model, *, lslr: bool = True, bnwb: bool = False, bnrs: bool = False,
                 msl_iterations: int = 0, da_iterations: int = 0, **kwargs):
        super().__init__(model, **kwargs)
        net = self.net
        steps = self.steps = self.inner_steps
        self.msl_iterations, self.da_iterations = msl_iterations, da_iterations
        extra = []
        self.lslr = None
        if lslr:
            self.lslr = len(extra)
            dtype = net.variables[0].dtype
            extra.append(tf.Variable(tf.fill([max(steps, 1), len(net.variables)],
                                             tf.constant(self.inner_lr, dtype)), name="lslr"))
        self.norm_slots = {}   # index of a norm weight in net.variables -> index in extra
        if bnwb:
            owners = net.param_layers()
            norms = [i for i, layer in enumerate(owners) if is_normalization(layer)]
            if not norms:
                raise ValueError("bnwb needs normalisation layers in the network.")
            for i in norms:
                self.norm_slots[i] = len(extra)
                v = net.variables[i]
                extra.append(tf.Variable(tf.repeat(v.value[None], steps + 1, axis=0),
                                         name=f"bnwb_{_safe(v.path)}"))
        self.extra = extra
        self.bnrs = bnrs
        # During meta_gradient: {step: [per-layer (mean, var)] per forward pass}. A plain
        # namespace, so that tf.Module does not try to track the traced tensors in it.
        self._record = types.SimpleNamespace(calls=None, query=False)
        if bnrs:
            channels = net.batch_norm_channels()
            if not channels:
                raise ValueError("bnrs needs batch-norm layers in the network.")
            self.state = [tf.Variable(init([steps + 1, c]), trainable=False, name=f"bnrs_{kind}{j}")
                          for j, c in enumerate(channels)
                          for kind, init in (("mean", tf.zeros), ("var", tf.ones))]

    def forward_at(self, params, x, extra, step):
        if not self.bnrs:
            return super().forward_at(params, x, extra, step)
        params, k = self.step_params(params, extra, step), min(step, self.steps)
        if self._record.calls is None and not self._record.query:
            return self._forward(params, x)   # evaluation, support set: its own statistics
        if self._record.calls is None:        # evaluation, query: step k's running statistics
            state = list(extra)[len(self.extra):]
            stats = [(state[2 * j][k], state[2 * j + 1][k]) for j in range(len(state) // 2)]
            return self._forward(params, x, norm_stats=stats)
        collect = []                  # meta-training: batch statistics, recorded for step k
        out = self._forward(params, x, collect=collect)
        self._record.calls.setdefault(k, []).append(collect)
        return out

    def query_metrics(self, params, x, y, extra=(), step=0):
        self._record.query = True
        try:
            return super().query_metrics(params, x, y, extra, step)
        finally:
            self._record.query = False

    def meta_step(self, weights, episode, steps, iteration=None, first_order=None):
        if not self.bnrs:
            return super().meta_step(weights, episode, steps, iteration, first_order)
        self._record.calls = {}
        try:
            loss, grads, per_step = super().meta_step(weights, episode, steps, iteration,
                                                      first_order)
            collected = self._record.calls
        finally:
            self._record.calls = None
        state = self.split(weights)[1][len(self.extra):]
        update = []
        for i, current in enumerate(state):   # i = 2 * layer + (0: mean, 1: var)
            rows = [tf.reduce_mean(tf.stack([call[i // 2][i % 2] for call in collected[k]]), 0)
                    if k in collected else current[k] for k in range(self.steps + 1)]
            update.append(tf.stack(rows))
        return loss, grads, dataclasses.replace(per_step, state_update=update)

    def update_state(self, values):
        m = self.BNRS_MOMENTUM
        for v, new in zip(self.state, values):
            v.assign(m * v + (1.0 - m) * new)

    def inner_lr_for(self, index, step, extra, dtype):
        if self.lslr is None:
            return super().inner_lr_for(index, step, extra, dtype)
        return extra[self.lslr][min(step, self.steps - 1), index]

    def step_params(self, params, extra, step):
        if not self.norm_slots:
            return params
        out = list(params)
        t = params[0].shape[0]
        for i, slot in self.norm_slots.items():
            row = tf.cast(extra[slot][min(step, self.steps)], params[i].dtype)
            out[i] = tf.broadcast_to(row, [t] + row.shape.as_list())
        return out

    def msl_weights(self, iteration: tf.Tensor) -> tf.Tensor:
        """Weights ``[steps]`` of the query losses after steps 1..S at ``iteration``."""
        s = self.steps
        progress = tf.cast(iteration, tf.float32) / float(self.msl_iterations)
        floor = self.MIN_WEIGHT / s
        early = tf.maximum(1.0 / s - progress / s, floor) * tf.ones([s - 1])
        last = tf.minimum(1.0 / s + progress * (s - 1) / s, 1.0 - (s - 1) * floor)
        return tf.concat([early, [last]], axis=0)

    def objective(self, step_losses, iteration):
        if not self.msl_iterations or iteration is None or self.steps < 2 or \
                len(step_losses) != self.steps + 1:
            return super().objective(step_losses, iteration)
        weights = tf.unstack(self.msl_weights(iteration))
        weighted = tf.add_n([w * tf.reduce_mean(l) for w, l in zip(weights, step_losses[1:])])
        return tf.where(tf.cast(iteration, tf.float32) < self.msl_iterations, weighted,
                        tf.reduce_mean(step_losses[-1]))

    def first_order_at(self, iteration):
        return self.first_order or iteration < self.da_iterations

    def write_summaries(self, step):
        if self.lslr is not None:
            rates = self.extra[self.lslr]
            for i, v in enumerate(self.net.variables):
                _scalar_summaries(f"lslr/{_safe(v.path)}",
                                  {f"step_{k}": rates[k, i] for k in range(rates.shape[0])}, step)
        if self.msl_iterations and self.steps >= 2:
            w = self.msl_weights(tf.constant(step, tf.float32))
            if step >= self.msl_iterations:
                w = tf.one_hot(self.steps - 1, self.steps)
            _scalar_summaries("msl_weight", {f"step_{k + 1}": w[k] for k in range(self.steps)}, step)
        for i, slot in self.norm_slots.items():
            tf.summary.histogram(f"bnwb/{_safe(self.net.variables[i].path)}", self.extra[slot], step=step)
        for v in self.state:
            tf.summary.histogram(f"bnrs/{_safe(v.name.split(':')[0])}", v, step=step)


class ProtoNet(MetaLearner):
    """Prototypical Networks (Snell et al. 2017) on the network's body (Conv-4 without its
    head, whose weights stay unused): each query is classified by the negative squared
    Euclidean distance of its embedding to the class means of the support embeddings.
    There is no inner loop, so ``StepMetrics`` has a single column."""

    SECOND_ORDER = False   # no inner loop

    def __init__(self, model, *, way: int | None = None, **kwargs):
        super().__init__(model, **kwargs)
        self.body, head = self.net.split_head()
        # The head (unused) was built for the task's classes: its outputs are the way.
        self.way = int(way or head.variables[-1].shape[-1])

    @property
    def reports_inner_steps(self):
        return False

    def inner_loop(self, weights, x, y, steps, first_order=None):
        raise NotImplementedError("ProtoNets has no inner loop: use meta_gradient, evaluate "
                                  "or meta_loss.")

    def meta_loss(self, weights, episode, steps, first_order=None, track_steps=True,
                  iteration=None):
        nb = len(self.body.variables)
        body = tile_for_tasks(weights[:nb], episode.support_x.shape[0])
        embed = lambda x: self.apply_in_compute_dtype(self.body, body, x)
        zs, zq = embed(episode.support_x), embed(episode.query_x)        # [T, N, D]
        onehot = tf.one_hot(episode.support_y, self.way)                 # [T, Ns, way]
        protos = tf.matmul(onehot, zs, transpose_a=True) / tf.reduce_sum(onehot, 1)[..., None]
        sq = (tf.reduce_sum(tf.square(zq), -1, keepdims=True)             # [T, Nq, way]
              - 2.0 * tf.matmul(zq, protos, transpose_b=True)
              + tf.reduce_sum(tf.square(protos), -1)[:, None, :])
        loss = self.loss_fn(-sq, episode.query_y)
        per_step = StepMetrics(loss[:, None], self.metric_fn(-sq, episode.query_y)[:, None])
        return tf.reduce_mean(loss), per_step


class Pretrain(MetaLearner):
    """The pre-training baseline: one network trained on all training tasks jointly, then
    fine-tuned on each test task's support set by the inner loop.

    Classification: the body learns a softmax over all ``num_classes`` training classes
    (its own head ``[D, C]``, the ``extra`` weights) on the episodes' images and their
    split-level labels (``Episode.classes``). Fine-tuning starts from the body and a zero
    N-way head. Regression (sinusoid): the network regresses all tasks jointly, with no inner
    loop (``train_inner_steps`` is 0), as the paper's baseline.
    """

    SECOND_ORDER = False   # no outer tape through an inner loop

    def __init__(self, model, *, num_classes: int | None = None, **kwargs):
        super().__init__(model, **kwargs)
        self.body, self.head = self.net.split_head()
        self.num_classes = num_classes
        if num_classes:
            dim, dtype = self.head.variables[0].shape[0], self.head.variables[0].dtype
            self.extra = [tf.Variable(keras.initializers.GlorotUniform()((dim, num_classes), dtype),
                                      name="all_classes_kernel"),
                          tf.Variable(tf.zeros([num_classes], dtype), name="all_classes_bias")]

    def inner_loop(self, weights, x, y, steps, first_order=None):
        if self.num_classes:
            nh = len(self.head.variables)
            net_weights, extra = self.split(weights)
            weights = net_weights[:-nh] + [tf.zeros_like(w) for w in net_weights[-nh:]] + extra
        return super().inner_loop(weights, x, y, steps, first_order)

    def meta_step(self, weights, episode, steps, iteration=None, first_order=None):
        if not self.num_classes:
            return super().meta_step(weights, episode, steps, iteration, first_order)
        if episode.classes is None:
            raise ValueError("Pre-training on all classes needs Episode.classes (the split-level "
                             "class of each label); the data pipelines provide it.")
        with tf.GradientTape() as tape:
            tape.watch(weights)
            net_weights, (kernel, bias) = self.split(weights)
            nb = len(self.body.variables)
            x = tf.concat([episode.support_x, episode.query_x], axis=1)
            y = tf.gather(episode.classes, tf.concat([episode.support_y, episode.query_y], 1),
                          batch_dims=1)
            body = tile_for_tasks(net_weights[:nb], x.shape[0])
            logits = tf.matmul(self.apply_in_compute_dtype(self.body, body, x), kernel) + bias
            task_loss = self.loss_fn(logits, y)
            loss = tf.reduce_mean(task_loss)
        grads = tape.gradient(loss, weights, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return loss, grads, StepMetrics(task_loss[:, None], self.metric_fn(logits, y)[:, None])


def build_learner(config, model: keras.Model, num_classes: int | None = None) -> MetaLearner:
    """The learner of ``config.algorithm`` around ``model``.

    num_classes: training classes for the pre-training baseline on images (None reads the
    training split's class count).
    """
    kwargs = dict(inner_lr=config.inner_lr, inner_steps=config.inner_steps,
                  first_order=config.first_order,
                  loss="mse" if config.is_regression else "cross_entropy",
                  metric=None if config.is_regression else "accuracy",
                  recompute=config.inner_recompute,
                  compute_dtype=None if config.precision == "float32" else config.precision,
                  inner_optimizer=config.inner_optimizer, allow_inexact=config.allow_inexact)
    algorithm = config.algorithm
    if algorithm in ("maml", "fomaml"):
        return MetaLearner(model, **kwargs)
    if algorithm == "mamlpp":
        return MamlPlusPlus(model, lslr=config.lslr, bnwb=config.bnwb, bnrs=config.bnrs,
                            msl_iterations=config.msl_iterations,
                            da_iterations=config.da_iterations, **kwargs)
    if algorithm == "protonet":
        return ProtoNet(model, way=config.way, **kwargs)
    if algorithm == "pretrain":
        if not config.is_regression and num_classes is None:
            from maml_tf import data as data_lib
            num_classes = int(data_lib.split_images(config, "train").shape[0])
        return Pretrain(model, num_classes=None if config.is_regression else num_classes,
                        **kwargs)
    return {"reptile": Reptile, "metasgd": MetaSGD, "anil": ANIL}[algorithm](model, **kwargs)


def train_inner_steps(config) -> int:
    """Inner steps during meta-training: none for the pre-training baseline (it trains one
    network on all tasks jointly and is fine-tuned only at evaluation) or ProtoNets."""
    return 0 if config.algorithm in ("pretrain", "protonet") else config.inner_steps
