"""Each algorithm's own check, beyond the shared contract (tests/learner_contract_test.py).

Comparisons are exact identities between two computations that reach the same number by
different code paths (an independent per-task Keras gradient, a masked MAML, numpy), or
float64 finite differences for the learned rates.
"""

import numpy as np
import tensorflow as tf
import keras

from maml_tf.data.episode import Episode
from maml_tf import losses
from maml_tf.config import Config
from maml_tf.algorithms import build_learner
from maml_tf.meta_learner import MetaLearner
from maml_tf.harness import current_lr, make_optimizer
from maml_tf.models import get_model
from maml_tf.models.keras_layers import is_normalization

WAY, SHOT, QUERY, TASKS = 5, 2, 2, 3


def _config(algorithm, **kw):
    base = {"dataset": "omniglot", "algorithm": algorithm, "way": WAY, "shot": SHOT,
            "query": QUERY, "num_filters": 8, "inner_lr": 0.3, "meta_batch_size": TASKS}
    return Config.from_dict({**base, **kw})


def _episode(seed=0, dtype="float32"):
    rng = np.random.default_rng(seed)

    def part(n):
        x = rng.uniform(size=(TASKS, WAY * n, 28, 28, 1)).astype(dtype)
        y = np.broadcast_to(np.tile(np.arange(WAY), n), (TASKS, WAY * n)).astype("int32")
        return tf.constant(x), tf.constant(y)
    classes = np.stack([rng.permutation(12)[:WAY] for _ in range(TASKS)]).astype("int32")
    return Episode(*part(SHOT), *part(QUERY), tf.constant(classes))


def _sinusoid_episode(seed=0):
    rng = np.random.default_rng(seed)

    def part(n):
        x = rng.uniform(-5, 5, size=(TASKS, n, 1))
        return tf.constant(x), tf.constant(np.sin(x))
    return Episode(*part(5), *part(5))


class _Masked(MetaLearner):
    """MAML whose inner loop leaves the parameters with index in ``frozen`` unchanged."""

    def __init__(self, model, frozen=(), **kwargs):
        super().__init__(model, **kwargs)
        self.frozen = set(frozen)

    def inner_lr_for(self, index, step, extra, dtype):
        return tf.constant(0.0 if index in self.frozen else self.inner_lr, dtype)


def _loss_and_grads(learner, weights, episode, steps, **kw):
    loss, grads, _ = learner.meta_step(list(weights), episode, steps, **kw)
    return float(loss), [g.numpy() for g in grads]


def _sinusoid_learner(**kw):
    """A float64 sinusoid learner whose weights are O(1) random (the default init is tiny,
    which would make every rate gradient tiny too)."""
    config = Config.from_dict({"dataset": "sinusoid", "inner_lr": 0.01, **kw})
    learner = build_learner(config, get_model(config, dtype="float64"))
    rng = np.random.default_rng(1)
    for v in learner.net.variables:
        v.assign(0.2 * rng.normal(size=v.shape))
    return learner


def _fd_check(test, learner, episode, steps, index, eps=1e-6):
    """The meta-gradient w.r.t. ``weights[index]`` against central differences (float64)."""
    weights = [tf.constant(w) for w in learner.meta_weights()]
    _, grads = _loss_and_grads(learner, weights, episode, steps)
    rng = np.random.default_rng(0)
    v = rng.normal(size=weights[index].shape)
    v /= np.linalg.norm(v)

    def at(sign):
        moved = list(weights)
        moved[index] = weights[index] + sign * eps * v
        return float(learner.meta_loss(moved, episode, steps)[0])
    numeric = (at(1) - at(-1)) / (2 * eps)
    analytic = float(np.sum(grads[index] * v))
    test.assertGreater(abs(analytic), 1e-6)
    test.assertAllClose(analytic, numeric, rtol=1e-5, atol=1e-9)


def _equals_maml_on_the_weights(test, config, episode, steps):
    """Builds ``config``'s learner and MAML on one model; asserts equal meta-losses and equal
    network-weight meta-gradients; returns (learner, gradients of its extra tensors)."""
    model = get_model(config)
    learner = build_learner(config, model)
    maml = build_learner(Config.from_dict({**config.to_dict(), "algorithm": "maml",
                                           "lslr": False}), model)
    loss_l, grads_l = _loss_and_grads(learner, learner.meta_weights(), episode, steps)
    loss_m, grads_m = _loss_and_grads(maml, maml.meta_weights(), episode, steps)
    test.assertAllClose(loss_l, loss_m, rtol=1e-6)
    n = len(maml.meta_variables)
    for a, b in zip(grads_l[:n], grads_m):
        test.assertAllClose(a, b, rtol=1e-4, atol=1e-7)
    return learner, grads_l[n:]


class ReptileTest(tf.test.TestCase):

    def _per_task_grads(self, model, episode):
        """Each task's support-loss gradient through the plain Keras model (no task axis)."""
        out = []
        for t in range(TASKS):
            with tf.GradientTape() as tape:
                logits = model(episode.support_x[t], training=True)
                loss = losses.cross_entropy(logits[None], episode.support_y[t][None])[0]
            out.append([g.numpy() for g in tape.gradient(loss, model.trainable_variables)])
        return out

    def test_one_sgd_step_equals_the_closed_form(self):
        # phi_t = theta - alpha * g_t, so theta - mean(phi) = alpha * mean_t g_t.
        config = _config("reptile")
        model = get_model(config)
        learner = build_learner(config, model)
        ep = _episode()
        _, grads = _loss_and_grads(learner, learner.meta_weights(), ep, 1)
        per_task = self._per_task_grads(model, ep)
        for k, g in enumerate(grads):
            expected = config.inner_lr * np.mean([task[k] for task in per_task], axis=0)
            self.assertAllClose(g, expected, rtol=1e-4, atol=1e-7)

    def test_one_adam_step_is_a_normalised_step(self):
        # Adam with beta1 = 0 after one step: phi = theta - alpha * g / (|g| + eps).
        config = _config("reptile", inner_optimizer="adam", inner_lr=0.01)
        model = get_model(config)
        learner = build_learner(config, model)
        ep = _episode(1)
        _, grads = _loss_and_grads(learner, learner.meta_weights(), ep, 1)
        per_task = self._per_task_grads(model, ep)
        for k, g in enumerate(grads):
            steps = [task[k] / (np.abs(task[k]) + 1e-8) for task in per_task]
            self.assertAllClose(g, 0.01 * np.mean(steps, axis=0), rtol=1e-3, atol=1e-6)

    def test_sgd_outer_step_moves_towards_the_adapted_weights(self):
        # With SGD at rate eps the update is theta += eps * mean(phi - theta).
        config = _config("reptile", meta_optimizer="sgd", meta_lr=0.5)
        model = get_model(config)
        learner = build_learner(config, model)
        ep = _episode(2)
        theta = [w.numpy() for w in learner.meta_weights()]
        phi = learner.inner_loop(learner.meta_weights(), ep.support_x, ep.support_y, 2)[-1]
        _, grads, _ = learner.meta_step(learner.meta_weights(), ep, 2)
        optimizer = make_optimizer(config)
        optimizer.apply(grads, learner.meta_variables)
        for t, p, v in zip(theta, phi, learner.meta_variables):
            self.assertAllClose(v.numpy(), t + 0.5 * (np.mean(p.numpy(), 0) - t), atol=1e-6)


class MetaSgdTest(tf.test.TestCase):

    def test_rates_at_alpha_reproduce_maml_and_receive_meta_gradients(self):
        metasgd, rate_grads = _equals_maml_on_the_weights(self, _config("metasgd"), _episode(3), 2)
        n = len(metasgd.net.variables)
        self.assertLen(rate_grads, n)
        for g, v in zip(rate_grads, metasgd.extra):
            self.assertEqual(g.shape, tuple(v.shape))
        self.assertGreater(sum(float(np.abs(g).sum()) for g in rate_grads), 0.0)

    def test_rate_gradient_matches_finite_differences(self):
        learner = _sinusoid_learner(algorithm="metasgd")
        n = len(learner.net.variables)
        _fd_check(self, learner, _sinusoid_episode(), 2, index=n)        # rates of layer 0
        _fd_check(self, learner, _sinusoid_episode(), 2, index=n + 4)    # rates of the head


class AnilTest(tf.test.TestCase):

    def test_body_gets_no_inner_update(self):
        config = _config("anil")
        learner = build_learner(config, get_model(config))
        ep = _episode(4)
        weights = learner.meta_weights()
        nb = len(learner.body.variables)
        trajectory = learner.inner_loop(weights, ep.support_x, ep.support_y, 3)
        for params in trajectory[1:]:
            for p, w in zip(params[:nb], weights[:nb]):
                self.assertAllEqual(p.numpy(), np.broadcast_to(w.numpy(), p.shape))
        # ... while the head moves.
        self.assertGreater(float(tf.reduce_max(tf.abs(trajectory[3][-1] - trajectory[0][-1]))), 0)

    def test_equals_maml_with_the_body_frozen_in_the_inner_loop(self):
        config = _config("anil")
        model = get_model(config)
        anil = build_learner(config, model)
        nb = len(anil.body.variables)
        masked = _Masked(model, inner_lr=config.inner_lr, frozen=range(nb))
        ep = _episode(5)
        loss_a, grads_a = _loss_and_grads(anil, anil.meta_weights(), ep, 2)
        loss_m, grads_m = _loss_and_grads(masked, masked.meta_weights(), ep, 2)
        self.assertAllClose(loss_a, loss_m, rtol=1e-6)
        for a, b in zip(grads_a, grads_m):
            self.assertAllClose(a, b, rtol=1e-4, atol=1e-6)


class MamlPlusPlusTest(tf.test.TestCase):

    def test_lslr_with_frozen_rates_equals_maml(self):
        config = _config("mamlpp", inner_steps=3, lslr=True)
        mamlpp, (rates,) = _equals_maml_on_the_weights(self, config, _episode(6), 3)
        self.assertEqual(rates.shape, (3, len(mamlpp.net.variables)))
        self.assertTrue(np.all(np.abs(rates).sum(axis=1) > 0))   # every step's rates learn

    def test_lslr_gradient_matches_finite_differences(self):
        learner = _sinusoid_learner(algorithm="mamlpp", inner_steps=2, lslr=True)
        _fd_check(self, learner, _sinusoid_episode(1), 2, index=len(learner.net.variables))

    def test_bnwb_equals_maml_with_frozen_norm_weights(self):
        # At initialisation every step's norm weights equal the network's, so the forward
        # pass is MAML's with norm weights not adapted; by the chain rule the network's norm
        # weight gradient there is the sum of the per-step rows' gradients.
        config = _config("mamlpp", inner_steps=2, bnwb=True)
        model = get_model(config)
        mamlpp = build_learner(config, model)
        owners = mamlpp.net.param_layers()
        norm = [i for i, layer in enumerate(owners) if is_normalization(layer)]
        masked = _Masked(model, inner_lr=config.inner_lr, frozen=norm)
        ep = _episode(7)
        loss_p, grads_p = _loss_and_grads(mamlpp, mamlpp.meta_weights(), ep, 2)
        loss_m, grads_m = _loss_and_grads(masked, masked.meta_weights(), ep, 2)
        self.assertAllClose(loss_p, loss_m, rtol=1e-6)
        for i, (a, b) in enumerate(zip(grads_p, grads_m)):
            if i in norm:
                self.assertAllEqual(a, np.zeros_like(a))   # the shared weights are unused
                rows = grads_p[mamlpp.split(grads_p)[0].__len__() + norm.index(i)]
                self.assertEqual(rows.shape[0], 3)          # steps 0, 1, 2
                self.assertAllClose(rows.sum(axis=0), b, rtol=1e-4, atol=1e-6)
            else:
                self.assertAllClose(a, b, rtol=1e-4, atol=1e-6)

    def test_bnrs_makes_each_query_prediction_independent_of_the_other_queries(self):
        def query_losses(bnrs):
            config = _config("mamlpp", inner_steps=2, bnrs=bnrs)
            keras.utils.set_random_seed(0)
            learner = build_learner(config, get_model(config))
            ep = _episode(11)
            if bnrs:   # a meta-training step fills the running statistics
                _, _, per_step = learner.meta_step(learner.meta_weights(), ep, 2)
                self.assertLen(per_step.state_update, 8)   # mean and variance of 4 layers
                learner.update_state(per_step.state_update)
                self.assertGreater(float(tf.reduce_max(tf.abs(learner.state[0]))), 0)
            weights = learner.meta_weights()
            fast = learner.inner_loop(weights, ep.support_x, ep.support_y, 2)[-1]
            extra = learner.split(weights)[1]
            loss = lambda x, y: learner.query_metrics(fast, x, y, extra, 2)[0].numpy()
            qx, qy = ep.query_x, ep.query_y
            together = loss(qx[:, :2], qy[:, :2])
            apart = (loss(qx[:, :1], qy[:, :1]) + loss(qx[:, 1:2], qy[:, 1:2])) / 2
            return together, apart
        together, apart = query_losses(bnrs=True)
        self.assertAllClose(together, apart, rtol=1e-5)
        together, apart = query_losses(bnrs=False)      # batch statistics mix the queries
        self.assertGreater(float(np.max(np.abs(together - apart))), 1e-3)

    def test_msl_weights_anneal_from_uniform_to_the_last_step(self):
        config = _config("mamlpp", inner_steps=4, msl_iterations=100)
        learner = build_learner(config, get_model(config))
        start = learner.msl_weights(tf.constant(0.0)).numpy()
        self.assertAllClose(start, [0.25] * 4)
        for it in (0.0, 30.0, 99.0, 500.0):
            self.assertAllClose(learner.msl_weights(tf.constant(it)).numpy().sum(), 1.0)
        late = learner.msl_weights(tf.constant(99.0)).numpy()
        self.assertAllClose(late[:3], [0.03 / 4] * 3)
        step_losses = tf.unstack(tf.constant([[9.0, 4.0, 3.0, 2.0, 1.0], [7.0, 2.0, 2.0, 2.0, 3.0]]), axis=1)
        self.assertAllClose(learner.objective(step_losses, tf.constant(0.0)),
                            np.mean([3.0, 2.5, 2.0, 2.0]))
        self.assertAllClose(learner.objective(step_losses, tf.constant(100.0)), 2.0)

    def test_scores_every_step_while_its_update_reads_them(self):
        # The multi-step loss reads every step's query loss for msl_iterations; the per-step
        # running statistics are recorded from every step's query pass. Otherwise the loop
        # may score the last step only (--step_metrics_every).
        plain = _config("mamlpp", inner_steps=3)
        msl = _config("mamlpp", inner_steps=3, msl_iterations=5)
        bnrs = _config("mamlpp", inner_steps=3, bnrs=True)
        scores = lambda c: [build_learner(c, get_model(c)).scores_every_step_at(i)
                            for i in (0, 4, 5, 100)]
        self.assertEqual(scores(plain), [False] * 4)
        self.assertEqual(scores(msl), [True, True, False, False])
        self.assertEqual(scores(bnrs), [True] * 4)
        maml = _config("maml", inner_steps=3)
        self.assertFalse(build_learner(maml, get_model(maml)).scores_every_step_at(0))

    def test_derivative_order_annealing_switches_once(self):
        config = _config("mamlpp", da_iterations=3)
        learner = build_learner(config, get_model(config))
        self.assertEqual([learner.first_order_at(i) for i in range(5)],
                         [True, True, True, False, False])
        ep = _episode(8)
        _, first = _loss_and_grads(learner, learner.meta_weights(), ep, 1, first_order=True)
        _, second = _loss_and_grads(learner, learner.meta_weights(), ep, 1, first_order=False)
        self.assertGreater(max(float(np.abs(a - b).max()) for a, b in zip(first, second)), 1e-6)


class ScheduleTest(tf.test.TestCase):

    def test_outer_schedules(self):
        def lr_at(schedule, iteration, **kw):
            opt = make_optimizer(_config("maml", meta_lr=0.1, meta_lr_schedule=schedule,
                                         num_iterations=100, **kw))
            opt.build([keras.Variable(1.0)])
            opt.iterations.assign(iteration)
            return current_lr(opt)
        self.assertAllClose([lr_at("constant", i) for i in (0, 100)], [0.1, 0.1])
        self.assertAllClose([lr_at("linear", i) for i in (0, 50, 100)], [0.1, 0.05, 0.0])
        self.assertAllClose([lr_at("cosine", i, min_meta_lr=0.001) for i in (0, 50, 100)],
                            [0.1, 0.0505, 0.001], atol=1e-6)


class ProtoNetTest(tf.test.TestCase):

    def test_loss_matches_a_numpy_reference(self):
        config = _config("protonet")
        learner = build_learner(config, get_model(config))
        ep = _episode(9)
        loss, per_step = learner.meta_loss(learner.meta_weights(), ep, 0)
        nb = len(learner.body.variables)
        body = [tf.stack([w] * TASKS) for w in learner.meta_weights()[:nb]]
        zs = learner.body.apply(body, ep.support_x).numpy()
        zq = learner.body.apply(body, ep.query_x).numpy()
        expected_loss, expected_acc = [], []
        for t in range(TASKS):
            protos = np.stack([zs[t][ep.support_y.numpy()[t] == c].mean(0) for c in range(WAY)])
            logits = -((zq[t][:, None, :] - protos[None]) ** 2).sum(-1)
            logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1,
                                   keepdims=True)) - logits.max(1, keepdims=True)
            y = ep.query_y.numpy()[t]
            expected_loss.append(-logp[np.arange(len(y)), y].mean())
            expected_acc.append((logits.argmax(1) == y).mean())
        self.assertAllClose(float(loss), np.mean(expected_loss), rtol=1e-4)
        self.assertAllClose(per_step.accuracy[:, 0], expected_acc)


class PretrainTest(tf.test.TestCase):

    def test_trains_an_all_class_softmax_and_fine_tunes_from_a_zero_head(self):
        config = _config("pretrain")
        learner = build_learner(config, get_model(config), num_classes=12)
        ep = _episode(10)
        loss, grads = _loss_and_grads(learner, learner.meta_weights(), ep, 0)
        net_grads, (kernel_grad, bias_grad) = learner.split(grads)
        nh = len(learner.head.variables)
        for g in net_grads[-nh:]:
            self.assertAllEqual(g, np.zeros_like(g))     # the N-way head is not trained
        self.assertGreater(float(np.abs(kernel_grad).sum()), 0)
        # The loss is the softmax over all 12 classes at each image's global label.
        nb = len(learner.body.variables)
        body = [tf.stack([w] * TASKS) for w in learner.meta_weights()[:nb]]
        x = tf.concat([ep.support_x, ep.query_x], 1)
        labels = np.take_along_axis(ep.classes.numpy(),
                                    tf.concat([ep.support_y, ep.query_y], 1).numpy(), 1)
        logits = learner.body.apply(body, x).numpy() @ learner.extra[0].numpy() + learner.extra[1].numpy()
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        expected = -np.take_along_axis(logp, labels[..., None], -1).mean()
        self.assertAllClose(loss, expected, rtol=1e-5)
        # Fine-tuning starts from the body and a zero head.
        start = learner.inner_loop(learner.meta_weights(), ep.support_x, ep.support_y, 1)[0]
        for p in start[-nh:]:
            self.assertAllEqual(p.numpy(), np.zeros(p.shape))
