"""The JAX reference step: Conv-4 MAML written directly in JAX, the whole meta-step (inner
steps, meta-gradient, Adam) in one ``jit``; tasks by ``vmap`` (``jax_step.py CONFIG vmap``:
per-task fast weights make every convolution a grouped one) or by ``lax.map`` (``... map``:
one task after another, plain convolutions). Runs in the peers' environment
(``benchmarks/peers/README.md``); started by ``compare.py``, speaks ``_protocol``."""

import sys
import time

import jax
import jax.numpy as jnp

import _protocol as P


def forward(p, x):
    for i in range(4):
        x = jax.lax.conv_general_dilated(x, p[f"conv{i}"], (2, 2), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        mean = x.mean((0, 1, 2))
        var = jnp.square(x - mean).mean((0, 1, 2))
        x = (x - mean) * jax.lax.rsqrt(var + P.EPS) * p[f"gamma{i}"] + p[f"beta{i}"]
        x = jax.nn.relu(x)
    return x.mean((1, 2)) @ p["head_w"] + p["head_b"]


def loss(p, x, y):
    logits = forward(p, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


def make_step(inner_steps: int, first_order: bool, tasks_by: str = "vmap"):
    def task_loss(p, sx, sy, qx, qy):
        fast = p
        for _ in range(inner_steps):
            g = jax.grad(loss)(fast, sx, sy)
            if first_order:
                g = jax.lax.stop_gradient(g)
            fast = jax.tree_util.tree_map(lambda w, d: w - P.INNER_LR * d, fast, g)
        return loss(fast, qx, qy)

    def meta_loss(p, batch):
        if tasks_by == "map":
            return jax.lax.map(lambda task: task_loss(p, *task), batch).mean()
        return jax.vmap(task_loss, in_axes=(None, 0, 0, 0, 0))(p, *batch).mean()

    @jax.jit
    def step(p, m, v, t, batch):
        value, g = jax.value_and_grad(meta_loss)(p, batch)
        t = t + 1
        m = jax.tree_util.tree_map(lambda a, b: 0.9 * a + 0.1 * b, m, g)
        v = jax.tree_util.tree_map(lambda a, b: 0.999 * a + 0.001 * b * b, v, g)
        lr = P.META_LR * jnp.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
        p = jax.tree_util.tree_map(lambda w, a, b: w - lr * a / (jnp.sqrt(b) + 1e-7), p, m, v)
        return p, m, v, t, value
    return step


def main():
    config = P.CONFIGS[sys.argv[1]]
    tasks_by = sys.argv[2] if len(sys.argv) > 2 else "vmap"
    step = make_step(**config, tasks_by=tasks_by)
    state = [{k: jnp.asarray(v) for k, v in P.conv4_params().items()}]
    state += [jax.tree_util.tree_map(jnp.zeros_like, state[0])] * 2 + [jnp.zeros((), jnp.float32)]
    batch = tuple(jnp.asarray(a) for a in P.episode())

    def run():
        *new, value = step(*state, batch)
        state[:] = new
        return value

    t0 = time.perf_counter()
    run().block_until_ready()
    P.reply(ready=True, compile_s=time.perf_counter() - t0, framework=f"jax {jax.__version__} ({tasks_by})")
    matmul = jax.jit(lambda a: a @ a)
    P.serve(run, lambda v: v.block_until_ready(),
            lambda: P.time_matmul(lambda n: matmul(jnp.ones((n, n), jnp.float32)),
                                  lambda v: v.block_until_ready()))


if __name__ == "__main__":
    main()
