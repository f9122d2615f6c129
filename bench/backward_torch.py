"""The compiled backward against PyTorch on the CPU, forward + backward of the same loss:
attnc's `Kernel.grad(backend="cpu")` (the forward with its saved statistics, then the
backward kernels, from NumPy arrays; every float input's gradient) against PyTorch's
forward + `backward()` of the same variant: SDPA (`scaled_dot_product_attention`),
FlexAttention (`torch.compile(flex_attention)`, where it expresses the variant) and eager
PyTorch with the score matrix materialized (the mask and bias built outside the timed
step, so eager does not differentiate a slope; attnc does).

Same inputs on both sides (the tensors `bench/compare_torch.py` builds), same threads, f32;
the sides alternate `--rounds` times, each a median of `--runs`, and each keeps its best.
Ratio = PyTorch time / attnc time (> 1: attnc is faster).

  .venv-bench/bin/python bench/backward_torch.py [--n 1024 2048] [--rounds 3] [--threads 2] [--variants sdpa_causal alibi ...]
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_torch as ct  # noqa: E402  (the inputs and the PyTorch forms of each variant)

import attnc  # noqa: E402

ROOT = ct.ROOT
# Tier A softmax variants the compiled backward covers (see docs/backward.md).
VARIANTS = ["sdpa_causal", "alibi", "sliding_window_sink", "document_mask", "prefix_lm", "softcap", "sink_softmax"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=VARIANTS)
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compiles take a while)")
    a = ap.parse_args()
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(a.threads)
    B, H, D = 1, 8, 64
    print(f"# forward + backward, attnc vs PyTorch {torch.__version__}: B={B} H={H} D={D} f32, {a.threads} threads, best of {a.rounds} alternating rounds, each a median of {a.runs}")
    print(f"{'variant':20} {'N':>5} {'attnc ms':>9} {'base':>6} {'base ms':>9} {'ratio':>6}")
    for n in a.n:
        for spec in a.variants:
            kern = attnc.compile(os.path.join(ROOT, "examples", f"{spec}.attn"), threads=a.threads)
            G = H
            q, k, v, extra = ct.make_inputs(torch, spec, B, H, G, n, D)
            given = {"q": q, "k": k, "v": v, **{name: t for name, t in extra.items() if t is not None}}
            ins = {name: given[name].numpy() for name in ct.spec_inputs(spec)}
            do = np.random.default_rng(0).standard_normal(kern(**ins).shape).astype(np.float32)
            do_t = torch.from_numpy(do)
            # PyTorch's leaves: q, k, v (what every baseline differentiates).
            qt, kt, vt = (x.clone().requires_grad_(True) for x in (q, k, v))
            base = []
            if spec in ct.SDPA:
                base.append(("sdpa", lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=spec != "sdpa")))
            if spec in ct.FLEX and not a.no_flex:
                try:
                    base.append(("flex", ct.flex(torch, spec, qt, kt, vt, extra, H)))
                except Exception as e:  # noqa: BLE001 - report and go on
                    print(f"{spec:20} {n:>5} flex unavailable: {ct.first_line(e)}")
            base.append(("eager", ct.eager(torch, spec, qt, kt, vt, extra, H, G)))

            def attnc_step():
                kern.grad(cotangent=do, backend="cpu", **ins)

            def torch_step(fwd):
                for x in (qt, kt, vt):
                    x.grad = None
                fwd().backward(do_t)

            # Each timing warms up first (compiles on the first call); medians in ms.
            best, failed = {"attnc": float("inf")}, {}
            for name, fwd in base:
                try:
                    torch_step(fwd)
                except Exception as e:  # noqa: BLE001
                    failed[name] = ct.first_line(e)
            for _ in range(a.rounds):
                best["attnc"] = min(best["attnc"], ct.median_time(attnc_step, a.runs))
                for name, fwd in base:
                    if name not in failed:
                        best[name] = min(best.get(name, float("inf")), ct.median_time(lambda: torch_step(fwd), a.runs))
            ms = best["attnc"]
            print(f"{spec:20} {n:>5} {ms:9.1f}")
            for name, _ in base:
                if name in failed:
                    print(f"{'':20} {n:>5} {'':9} {name:>6} failed: {failed[name]}")
                else:
                    print(f"{'':20} {n:>5} {'':9} {name:>6} {best[name]:9.1f} {best[name] / ms:6.2f}")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
