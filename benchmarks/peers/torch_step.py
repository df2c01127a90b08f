"""The PyTorch reference step: Conv-4 MAML with ``torch.func`` (``grad`` for the inner steps,
``vmap`` over tasks, the meta-gradient by ``grad`` of the whole), Adam from ``torch.optim``.
Eager (no ``torch.compile``). Runs in the peers' environment; started by ``compare.py``."""

import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

import _protocol as P

# TF's SAME padding for a 3x3 stride-2 conv (more padding at the end when it is odd).
_PADS = {28: (0, 1, 0, 1), 14: (0, 1, 0, 1), 7: (1, 1, 1, 1), 4: (0, 1, 0, 1)}


def forward(p, x):                                  # x [N, 1, 28, 28]
    for i in range(4):
        x = F.conv2d(F.pad(x, _PADS[x.shape[-1]]), p[f"conv{i}"], stride=2)
        mean = x.mean((0, 2, 3), keepdim=True)
        var = (x - mean).square().mean((0, 2, 3), keepdim=True)
        x = (x - mean) * torch.rsqrt(var + P.EPS)
        x = F.relu(x * p[f"gamma{i}"][:, None, None] + p[f"beta{i}"][:, None, None])
    return x.mean((2, 3)) @ p["head_w"] + p["head_b"]


def loss(p, x, y):
    return F.cross_entropy(forward(p, x), y)


def make_meta_grad(inner_steps: int, first_order: bool):
    def task_loss(p, sx, sy, qx, qy):
        fast = p
        for _ in range(inner_steps):
            g = grad(loss)(fast, sx, sy)
            fast = {k: fast[k] - P.INNER_LR * (g[k].detach() if first_order else g[k])
                    for k in fast}
        return loss(fast, qx, qy)

    def meta_loss(p, batch):
        return vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(p, *batch).mean()
    return grad(meta_loss), meta_loss


def main():
    torch.set_num_threads(os.cpu_count())
    config = P.CONFIGS[sys.argv[1]]
    params = {k: torch.tensor(v.transpose(3, 2, 0, 1) if k.startswith("conv") else v,
                              requires_grad=False)
              for k, v in P.conv4_params().items()}
    leaves = list(params.values())
    optimizer = torch.optim.Adam(leaves, lr=P.META_LR)
    sx, sy, qx, qy = P.episode()
    nchw = lambda a: torch.tensor(a.transpose(0, 1, 4, 2, 3))
    batch = (nchw(sx), torch.tensor(sy, dtype=torch.long), nchw(qx),
             torch.tensor(qy, dtype=torch.long))
    meta_grad, _ = make_meta_grad(**config)

    def run():
        g = meta_grad(params, batch)
        for k, leaf in params.items():
            leaf.grad = g[k]
        optimizer.step()
        return g

    t0 = time.perf_counter()
    run()
    P.reply(ready=True, compile_s=time.perf_counter() - t0, framework=f"torch {torch.__version__}")
    P.serve(run, lambda _: None,
            lambda: P.time_matmul(lambda n: torch.ones(n, n) @ torch.ones(n, n), lambda _: None))


if __name__ == "__main__":
    main()
