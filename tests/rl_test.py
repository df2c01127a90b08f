"""Reinforcement learning: the policy-gradient estimator, returns and baselines, vectorised
rollouts, TRPO, exact meta-gradients and Hessian-vector products, and the RL learner contract."""

import importlib.util
import json
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import maml_tf
from maml_tf import api
from maml_tf.config import Config, ConfigError
from maml_tf.data.navigation import Navigation2D
from maml_tf.models import layers as L
from maml_tf.rl import MetaRL, RLSettings, policy, returns, trpo
from maml_tf.rl.rollout import rollout_in_graph


def _learner(hidden=(16,), dtype="float32", oracle=False, first_order=False):
    keras.utils.set_random_seed(0)
    net = policy.gaussian_mlp(4 if oracle else 2, 2, hidden=hidden, dtype=dtype)
    return maml_tf.MAML(net, inner_lr=0.1, loss=policy.reinforce_loss, metric=None,
                        first_order=first_order)


def _batch(meta, num_tasks=2):
    env = meta.env
    tasks = env.sample_tasks(tf.constant([3, 4], tf.int64), num_tasks)
    seeds = tf.constant([[1, 2], [5, 6]], tf.int64)
    return meta.collect(meta.learner.meta_weights(), tasks, seeds)[0]


class PolicyGradientTest(tf.test.TestCase):

    def test_reinforce_gradient_matches_the_closed_form_on_a_gaussian_bandit(self):
        # One step, reward -(a - g)^2 for a ~ N(mu, sigma^2): J = -((mu - g)^2 + sigma^2), so
        # dJ/dmu = -2 (mu - g) and dJ/dlog(sigma) = -2 sigma^2. The learner's inner gradient of
        # reinforce_loss (advantages = rewards) must estimate -dJ.
        net = keras.Sequential([keras.Input((1,)), L.Dense(1, kernel_initializer="zeros", name="mean"),
                                policy.GaussianHead(init_log_std=np.log(0.7), name="log_std")])
        learner = maml_tf.MAML(net, inner_lr=0.1, loss=policy.reinforce_loss, metric=None)
        mu, sigma, goal, n = 0.3, 0.7, -0.5, 400_000
        params = [tf.zeros([1, 1, 1]), tf.fill([1, 1], mu), tf.fill([1, 1], np.log(sigma))]
        noise = tf.random.stateless_normal([1, n, 1], [7, 7])
        actions = mu + sigma * noise
        rewards = -tf.square(actions[..., 0] - goal)
        y = policy.pack(actions, rewards, tf.ones_like(rewards))
        grads, _ = learner.support_grads(params, tf.ones([1, n, 1]), y, first_order=True)
        closed = np.array([-2 * (mu - goal), -2 * sigma ** 2])
        estimate = -np.array([float(grads[1][0, 0]), float(grads[2][0, 0])])
        # The estimator's standard error, from the per-sample terms.
        z, r = noise.numpy()[0, :, 0], rewards.numpy()[0]
        per_sample = np.stack([z / sigma * r, (z ** 2 - 1) * r])
        stderr = per_sample.std(axis=1) / np.sqrt(n)
        self.assertTrue(np.all(np.abs(estimate - closed) < 4 * stderr), (estimate, closed, stderr))
        self.assertAllLess(stderr, 0.02)   # the check has power: the closed form is O(1)

    def test_discounting_gae_and_the_linear_baseline(self):
        rng = np.random.default_rng(0)
        rewards = rng.normal(size=(2, 3, 7)).astype(np.float32)
        mask = np.ones_like(rewards)
        mask[0, 1, 4:] = 0   # an episode that ended after 4 steps
        gamma = 0.9
        ref = np.zeros_like(rewards)
        for t in reversed(range(7)):
            ref[..., t] = rewards[..., t] * mask[..., t] + (gamma * ref[..., t + 1] if t < 6 else 0)
        got = returns.discounted_cumsum(tf.constant(rewards * mask), gamma).numpy()
        self.assertAllClose(got, ref, atol=1e-5)
        # GAE with lambda = 1 is the discounted return minus the baseline.
        values = rng.normal(size=rewards.shape).astype(np.float32) * mask
        adv = returns.gae(tf.constant(rewards * mask), tf.constant(values), tf.constant(mask),
                          gamma, 1.0).numpy()
        self.assertAllClose(adv, (ref - values) * mask, atol=1e-5)
        # The baseline is each task's least-squares fit on its own valid steps.
        obs = rng.normal(size=(2, 3, 7, 2)).astype(np.float32)
        fitted = returns.fit_baseline(tf.constant(obs), tf.constant(ref), tf.constant(mask)).numpy()
        feats = returns.baseline_features(tf.constant(obs), tf.constant(mask)).numpy()
        for t in range(2):
            valid = mask[t].reshape(-1) > 0
            x, y = feats[t].reshape(-1, feats.shape[-1])[valid], ref[t].reshape(-1)[valid]
            coef = np.linalg.solve(x.T @ x + returns.BASELINE_RIDGE * np.eye(x.shape[1]), x.T @ y)
            self.assertAllClose(fitted[t].reshape(-1)[valid], x @ coef, atol=1e-3)
        self.assertAllEqual(fitted[0, 1, 4:], np.zeros(3))
        norm = returns.normalize(tf.constant(adv), tf.constant(mask)).numpy()
        for t in range(2):
            valid = norm[t][mask[t] > 0]
            self.assertAllClose([valid.mean(), valid.std()], [0.0, 1.0], atol=1e-4)


class NavigationRolloutTest(tf.test.TestCase):

    def test_vectorised_rollouts_equal_a_step_by_step_reference(self):
        env = Navigation2D()
        learner = _learner()
        tasks = tf.constant([[0.3, -0.2], [0.001, 0.002], [-0.45, 0.4]])
        weights = learner.meta_weights()
        # A policy that aims at the goal with a small spread, so that some episodes end early.
        kernel, bias, k2, b2, log_std = [w.numpy() for w in weights]
        fast = [tf.tile(w[None], [3] + [1] * w.shape.rank) for w in weights]
        seed = tf.constant([11, 12], tf.int64)
        policy_fn = lambda obs: learner.forward_at(fast, obs, [], 0)  # noqa: E731
        got = rollout_in_graph(env, policy_fn, tasks, 4, seed, horizon=30)
        for t in range(3):
            for n in range(4):
                pos, alive = np.zeros(2, np.float32), True
                for h in range(30):
                    noise = tf.random.stateless_normal(
                        [3, 4, 2], tf.random.experimental.stateless_fold_in(seed, h)).numpy()[t, n]
                    hidden = np.maximum(pos @ kernel + bias, 0)
                    mean = hidden @ k2 + b2
                    action = mean + np.exp(log_std) * noise
                    self.assertAllClose(got.obs[t, n, h], pos, atol=1e-5)
                    self.assertAllClose(got.actions[t, n, h], action, atol=1e-4)
                    self.assertEqual(float(got.mask[t, n, h]), float(alive))
                    if alive:
                        pos = pos + np.clip(0.1 * action, -0.1, 0.1)
                        offset = pos - tasks.numpy()[t]
                        self.assertAllClose(got.rewards[t, n, h], -np.linalg.norm(offset), atol=1e-5)
                        alive = not np.all(np.abs(offset) < 0.01)
                    else:
                        self.assertEqual(float(got.rewards[t, n, h]), 0.0)

    def test_an_episode_ends_at_the_goal(self):
        env = Navigation2D()
        # The mean action moves straight to a goal that is exactly 2 steps of 0.1 away.
        tasks = tf.constant([[0.2, 0.0]])
        out = lambda obs: tf.concat([tf.ones_like(obs[..., :1]) * 1.0, tf.zeros_like(obs[..., :1]),  # noqa: E731
                                     tf.fill(tf.shape(obs), -30.0)], -1)
        tr = rollout_in_graph(env, out, tasks, 2, tf.constant([1, 1], tf.int64), horizon=6)
        self.assertAllEqual(tr.mask[0, 0], [1, 1, 0, 0, 0, 0])
        self.assertAllClose(tr.returns()[0], [-0.1, -0.1], atol=1e-4)


class ExactDerivativesTest(tf.test.TestCase):
    """The meta-gradient and the KL's Hessian-vector product through the inner step, against
    float64 central differences, on fixed sampled trajectories."""

    def setUp(self):
        super().setUp()
        sampler = MetaRL(_learner(hidden=(6,)), Navigation2D(),
                         RLSettings(trajectories=3, horizon=8))
        # Away from ReLU's kink: every episode starts at the origin, where zero biases put
        # every pre-activation exactly at 0 and the inner gradient (through relu') jumps.
        for i, v in enumerate(sampler.learner.meta_variables):
            if "bias" in v.name:
                v.assign(0.1 * tf.random.stateless_normal(v.shape, [i, 9]))
        batch = _batch(sampler)
        self.learner = _learner(hidden=(6,), dtype="float64")
        for v, w in zip(self.learner.meta_variables, sampler.learner.meta_variables):
            v.assign(tf.cast(w, tf.float64))
        self.meta = MetaRL(self.learner, Navigation2D(), RLSettings(trajectories=3, horizon=8))
        self.batch = type(batch)(*(tf.cast(t, tf.float64) for t in batch))
        self.flat = trpo.flatten(self.learner.meta_weights())
        self.direction = tf.random.stateless_normal(self.flat.shape, [3, 3], dtype=tf.float64)

    def test_meta_gradient_through_the_inner_step(self):
        loss, grad = self.meta._loss_and_grad_fn(self.flat, self.batch)
        eps = 1e-6
        f = lambda p: float(self.meta.surrogate(self.meta._weights(p), self.batch))  # noqa: E731
        fd = (f(self.flat + eps * self.direction) - f(self.flat - eps * self.direction)) / (2 * eps)
        self.assertAllClose(float(tf.tensordot(grad, self.direction, 1)), fd, rtol=1e-6, atol=1e-9)
        # The second-order term matters: first-order MAML's gradient differs.
        fo = MetaRL(_first_order_copy(self.learner), Navigation2D(),
                    RLSettings(trajectories=3, horizon=8))
        _, grad_fo = fo._loss_and_grad_fn(self.flat, self.batch)
        self.assertGreater(float(tf.norm(grad - grad_fo) / tf.norm(grad)), 1e-3)

    def test_kl_hessian_vector_product_through_the_inner_step(self):
        hvp = self.meta._hvp_fn(self.flat, self.batch, self.direction)

        def kl_grad(p):
            with tf.GradientTape() as tape:
                tape.watch(p)
                kl = self.meta.kl(self.meta._weights(p), self.batch)
            return tape.gradient(kl, p)
        eps = 1e-6
        fd = (kl_grad(self.flat + eps * self.direction) - kl_grad(self.flat - eps * self.direction)) / (2 * eps)
        self.assertAllClose(hvp, fd, rtol=1e-5, atol=1e-9)
        self.assertGreater(float(tf.norm(hvp)), 1e-3)

    def test_trpo_step_keeps_the_kl_within_the_limit_and_lowers_the_loss(self):
        meta = MetaRL(_learner(), Navigation2D(), RLSettings(trajectories=4, horizon=20, max_kl=0.005))
        batch = _batch(meta, num_tasks=3)
        before = trpo.flatten(meta.learner.meta_weights())
        info = meta.trpo_update(batch)
        self.assertGreater(info.step_fraction, 0)
        self.assertLessEqual(info.kl, 0.005)
        self.assertLess(info.loss_after, info.loss_before)
        after = meta.learner.meta_weights()
        # Recomputed from the assigned weights, independently of the line search's numbers.
        self.assertAllClose(float(meta.kl(after, batch)), info.kl, rtol=1e-4)
        self.assertLessEqual(float(meta.kl(after, batch)), 0.005 * (1 + 1e-4))
        self.assertAllClose(float(meta.surrogate(after, batch)), info.loss_after, rtol=1e-4)
        self.assertGreater(float(tf.norm(trpo.flatten(after) - before)), 0)

    def test_conjugate_gradient_solves_a_linear_system(self):
        a = tf.constant([[4.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 2.0]], tf.float64)
        b = tf.constant([1.0, 2.0, 3.0], tf.float64)
        x = trpo.conjugate_gradient(lambda v: tf.linalg.matvec(a, v), b, iterations=3)
        self.assertAllClose(x, np.linalg.solve(a.numpy(), b.numpy()), atol=1e-10)


def _first_order_copy(learner):
    copy = maml_tf.MAML(learner.net.model, inner_lr=learner.inner_lr, loss=policy.reinforce_loss,
                        metric=None, first_order=True)
    return copy


def _config(**kw):
    return Config.from_dict({"dataset": "navigation_2d", "inner_lr": 0.1, "eval_inner_steps": 2,
                             "eval_later_inner_lr": 0.05, "meta_optimizer": "trpo",
                             "meta_batch_size": 10, "trajectories": 10, "eval_trajectories": 10,
                             "num_iterations": 10, "eval_tasks": 10, "val_tasks": 4,
                             "log_every": 5, "eval_every": 10, "checkpoint_every": 5,
                             "horizon": 50, **kw})


@pytest.mark.isolated
def test_meta_training_makes_adaptation_pay_off_and_checkpoints_round_trip(tmp_path):
    # The contract for RL: once meta-trained for a few iterations, one inner step on a task's
    # trajectories raises its return; a checkpoint evaluates to the same numbers again.
    untrained = api.train(_config(num_iterations=0), str(tmp_path / "random"))
    results = api.train(_config(), str(tmp_path / "maml"))
    ret = results["test"]["return"]["mean"]
    assert ret[1] > ret[0] + 3, ret
    assert ret[1] > untrained["test"]["return"]["mean"][1] + 3, (ret, untrained["test"])
    assert results["protocol"]["inner_lrs"] == [0.1, 0.05]
    again = maml_tf.evaluate_workdir(str(tmp_path / "maml"))
    assert again["test"]["return"] == results["test"]["return"]
    saved = json.load(open(tmp_path / "maml" / "history.json"))
    assert [h["step"] for h in saved] == [10]


@pytest.mark.isolated
def test_every_rl_learner_trains_and_resumes(tmp_path):
    # First order, Meta-SGD's learned per-parameter step sizes, the oracle (the pre-trained
    # baseline observing its goal), and Adam as the outer optimizer, two iterations each; then
    # resuming. (Without XLA: the test above compiles the same functions with it.)
    for name, kw in [("fomaml", dict(algorithm="fomaml")), ("metasgd", dict(algorithm="metasgd")),
                     ("oracle", dict(algorithm="pretrain", oracle=True)),
                     ("adam", dict(meta_optimizer="adam", meta_lr=0.01))]:
        config = _config(num_iterations=2, eval_tasks=2, val_tasks=2, eval_every=2,
                         trajectories=3, eval_trajectories=3, meta_batch_size=2, horizon=10,
                         jit_compile=False, **kw)
        results = api.train(config, str(tmp_path / name))
        assert results["protocol"]["checkpoint_step"] == 2, name
        assert np.all(np.isfinite(results["test"]["return"]["mean"])), name
    resumed = api.train(_config(num_iterations=4, eval_tasks=2, val_tasks=2, eval_every=2,
                                     trajectories=3, eval_trajectories=3, meta_batch_size=2,
                                     horizon=10, meta_optimizer="adam", meta_lr=0.01,
                                     jit_compile=False),
                             str(tmp_path / "adam"))
    assert resumed["iterations_this_session"] == 2


class RLConfigTest(tf.test.TestCase):

    def test_bad_combinations_say_what_to_change(self):
        with self.assertRaisesRegex(ConfigError, "--trajectories is a reinforcement-learning switch"):
            Config.from_dict({"dataset": "sinusoid", "trajectories": 5})
        with self.assertRaisesRegex(ConfigError, "not implemented for reinforcement learning"):
            _config(algorithm="protonet")
        with self.assertRaisesRegex(ConfigError, "at most one policy-gradient inner step"):
            _config(inner_steps=2)
        with self.assertRaisesRegex(ConfigError, "trpo is the outer loop of reinforcement"):
            Config.from_dict({"dataset": "sinusoid", "meta_optimizer": "trpo"})
        with self.assertRaisesRegex(ConfigError, "runs on one device"):
            _config(strategy="mirrored")
        with self.assertRaisesRegex(ConfigError, r"\[0, 1\]"):
            _config(discount=1.5)

    def test_halfcheetah_without_its_extra_names_the_install_command(self):
        from maml_tf.rl.envs import make_env
        saved = {m: sys.modules.get(m) for m in ("gymnasium", "mujoco", "maml_tf.data.halfcheetah")}
        sys.modules["gymnasium"] = None   # as if not installed
        sys.modules.pop("maml_tf.data.halfcheetah", None)
        try:
            with self.assertRaisesRegex(ConfigError, r'pip install -e "\.\[rl\]"'):
                make_env("halfcheetah_vel")
        finally:
            for m, mod in saved.items():
                if mod is None:
                    sys.modules.pop(m, None)
                else:
                    sys.modules[m] = mod


@pytest.mark.skipif(importlib.util.find_spec("mujoco") is None or
                    importlib.util.find_spec("gymnasium") is None,
                    reason="HalfCheetah needs the optional extra: pip install -e \".[rl]\" "
                           "(gymnasium with MuJoCo)")
class HalfCheetahTest(tf.test.TestCase):

    def test_rewards_follow_the_goal(self):
        from maml_tf.data.halfcheetah import HalfCheetah
        for goal, tasks in (("vel", [[0.0], [2.0]]), ("dir", [[1.0], [-1.0]])):
            env = HalfCheetah(goal)
            tasks = np.array(tasks, np.float32)
            state = env.reset(tasks, 3, np.array([1, 2]))
            self.assertEqual(env.observe(state).shape, (2, 3, 17))
            total = np.zeros([2, 3])
            for _ in range(20):
                state, reward, done = env.step(state, np.zeros([2, 3, 6], np.float32), tasks)
                total += reward
                self.assertFalse(done.any())
            self.assertTrue(np.all(np.isfinite(total)))
            self.assertNotAllClose(total[0], total[1])
        # One step of the batched physics equals MuJoCo's own stepping of one copy.
        import mujoco
        env = HalfCheetah("vel")
        tasks = np.array([[1.0]], np.float32)
        state = env.reset(tasks, 2, np.array([3, 4]))
        action = np.random.default_rng(0).uniform(-1, 1, [1, 2, 6]).astype(np.float32)
        new, reward, _ = env.step(state, action, tasks)
        data = mujoco.MjData(env.model)
        data.qpos[:], data.qvel[:] = state[0][1, 1:10], state[0][1, 10:]
        data.ctrl[:] = action[0, 1]
        mujoco.mj_step(env.model, data, nstep=5)
        self.assertAllClose(new[0][1, 1:10], data.qpos, atol=1e-9)
        speed = (data.qpos[0] - state[0][1, 1]) / 0.05
        self.assertAllClose(reward[0, 1], -abs(speed - 1.0) - 0.05 * np.sum(action[0, 1] ** 2),
                            atol=1e-5)
        sampled = HalfCheetah("dir").sample_tasks(tf.constant([1, 2], tf.int64), 50).numpy()
        self.assertEqual(set(np.unique(sampled)), {-1.0, 1.0})

    def test_meta_rl_samples_and_updates_on_halfcheetah(self):
        from maml_tf.data.halfcheetah import HalfCheetah
        keras.utils.set_random_seed(0)
        learner = maml_tf.MAML(policy.gaussian_mlp(17, 6, hidden=(8,)), inner_lr=0.1,
                               loss=policy.reinforce_loss, metric=None)
        meta = MetaRL(learner, HalfCheetah("vel"), RLSettings(trajectories=2, horizon=15))
        batch = _batch(meta)
        self.assertEqual(batch.post_x.shape, (2, 30, 17))
        info = meta.trpo_update(batch)
        self.assertLessEqual(info.kl, 0.01)
