"""MAML++ (Antoniou et al. 2019): LSLR, BNWB, BNRS, MSL and DA on second-order MAML."""

from __future__ import annotations

import dataclasses
import types

import tensorflow as tf

from maml_tf.algorithms._util import safe_name, scalar_summaries
from maml_tf.meta_learner import MetaLearner
from maml_tf.models.keras_layers import is_normalization


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
        extra: list = []
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
                                         name=f"bnwb_{safe_name(v.path)}"))
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

    def meta_step(self, weights, episode, steps, iteration=None, first_order=None,
                  track_steps=True):
        if not self.bnrs:
            return super().meta_step(weights, episode, steps, iteration, first_order,
                                     track_steps)
        self._record.calls = {}
        try:
            loss, grads, per_step = super().meta_step(weights, episode, steps, iteration,
                                                      first_order, track_steps)
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
        # One loss only: the queries were scored after the last step alone, which the train
        # loop does past the multi-step phase only (scores_every_step_at).
        if not self.msl_iterations or iteration is None or self.steps < 2 or \
                len(step_losses) != self.steps + 1:
            return super().objective(step_losses, iteration)
        weights = tf.unstack(self.msl_weights(iteration))
        weighted = tf.add_n([w * tf.reduce_mean(loss) for w, loss in zip(weights, step_losses[1:])])
        return tf.where(tf.cast(iteration, tf.float32) < self.msl_iterations, weighted,
                        tf.reduce_mean(step_losses[-1]))

    def first_order_at(self, iteration):
        return self.first_order or iteration < self.da_iterations

    def scores_every_step_at(self, iteration):
        # The multi-step loss weighs every step's query loss; the per-step running statistics
        # are recorded from every step's query pass as well as the support's.
        return self.bnrs or (bool(self.msl_iterations) and self.steps >= 2 and
                             iteration < self.msl_iterations)

    def write_summaries(self, step):
        if self.lslr is not None:
            rates = self.extra[self.lslr]
            for i, v in enumerate(self.net.variables):
                scalar_summaries(f"lslr/{safe_name(v.path)}",
                                  {f"step_{k}": rates[k, i] for k in range(rates.shape[0])}, step)
        if self.msl_iterations and self.steps >= 2:
            w = self.msl_weights(tf.constant(step, tf.float32))
            if step >= self.msl_iterations:
                w = tf.one_hot(self.steps - 1, self.steps)
            scalar_summaries("msl_weight", {f"step_{k + 1}": w[k] for k in range(self.steps)}, step)
        for i, slot in self.norm_slots.items():
            tf.summary.histogram(f"bnwb/{safe_name(self.net.variables[i].path)}", self.extra[slot], step=step)
        for v in self.state:
            tf.summary.histogram(f"bnrs/{safe_name(v.name.split(':')[0])}", v, step=step)
