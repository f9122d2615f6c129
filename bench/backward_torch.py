"""The compiled backward against PyTorch on the CPU: attnc's `Kernel.grad(backend="cpu")`
(forward with its saved statistics, then the backward kernels, from NumPy arrays) against
torch's forward + backward of the same loss, alternating, best of `--rounds`.

  .venv-bench/bin/python bench/backward_torch.py [--n 1024 2048] [--rounds 3] [--threads 2]

sdpa_causal runs against `scaled_dot_product_attention(is_causal=True)`; alibi against
eager torch with the bias materialized (what a user without a fused kernel writes).
"""

import argparse
import os
import time

import numpy as np
import torch

import attnc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torch_step(spec, t, do):
    q, k, v = t["q"], t["k"], t["v"]
    if spec == "sdpa_causal":
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        n = q.shape[2]
        i = torch.arange(n)[:, None]
        j = torch.arange(n)[None, :]
        s = q @ k.transpose(-1, -2) / np.sqrt(q.shape[-1]) - t["slope"].view(-1, 1, 1) * (i - j).float()
        s = s.masked_fill(j > i, float("-inf"))
        o = torch.softmax(s, -1) @ v
    o.backward(do)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} threads; B=1, H=8, D=64; seconds for forward + backward, best of {a.rounds}")
    for spec in ("sdpa_causal", "alibi"):
        kern = attnc.compile(os.path.join(ROOT, "examples", f"{spec}.attn"), threads=a.threads)
        for n in a.n:
            dims = {d: v for d, v in dict(B=1, H=8, G=8, N=n, M=n, D=64, Dv=64).items() if d in kern._k.dims()}
            ins = kern.random_inputs(seed=0, **dims)
            do = np.random.default_rng(0).standard_normal(kern(**ins).shape).astype(np.float32)
            kern.grad(cotangent=do, backend="cpu", **ins)  # compile and warm up
            best_a = best_t = float("inf")
            for _ in range(a.rounds):
                t0 = time.perf_counter()
                kern.grad(cotangent=do, backend="cpu", **ins)
                best_a = min(best_a, time.perf_counter() - t0)
                t = {k: torch.from_numpy(x.astype(np.float32)).requires_grad_(True) for k, x in ins.items()}
                dt = torch.from_numpy(do.astype(np.float32))
                t0 = time.perf_counter()
                torch_step(spec, t, dt)
                best_t = min(best_t, time.perf_counter() - t0)
            print(f"{spec:12s} N={n:5d}  attnc {best_a:.3f} s  torch {best_t:.3f} s  ratio {best_t / best_a:.2f}x")


if __name__ == "__main__":
    main()
