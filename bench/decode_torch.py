#!/usr/bin/env python3
"""Decode steps on the CPU: one query row (or a few: `--rows 1 8`, a speculative block)
against a long key/value cache, attnc against PyTorch's scaled_dot_product_attention, in
one run.

Each shape (B=1, N rows, H heads, D channels, M keys, f32) is timed on both sides in
alternation, `--rounds` times, each a median of `--runs`; each side keeps its best round
(shared machines drift). attnc runs `attnc bench examples/sdpa.attn --dims ...` (its own
random inputs of the same shape); `--baseline-attnc PATH` adds another attnc build.

Set up as for compare_torch.py:
  python3 -m venv .venv-bench && .venv-bench/bin/pip install torch==2.15.0 numpy
  cargo build --release
  .venv-bench/bin/python bench/decode_torch.py [--shapes 8x64x4096 32x128x4096] [--rounds 3]
"""
import argparse
import os
import re
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATTNC = os.path.join(ROOT, "target", "release", "attnc")


def attnc_ms(exe, n, h, d, m, threads, runs):
    dims = f"B=1,H={h},N={n},M={m},D={d},Dv={d}"
    cmd = [exe, "bench", os.path.join(ROOT, "examples", "sdpa.attn"), "--dims", dims, "--threads", str(threads), "--runs", str(runs)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    found = re.search(r"median ([0-9.]+) ms", out.stdout)
    if out.returncode != 0 or not found:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()}")
    return float(found.group(1))


def torch_ms(torch, n, h, d, m, runs):
    q, k, v = torch.randn(1, h, n, d), torch.randn(1, h, m, d), torch.randn(1, h, m, d)
    f = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)
    for _ in range(3):
        f()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2] * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["8x64x4096", "32x128x4096", "8x64x16384", "32x64x2048"], help="HxDxM")
    ap.add_argument("--rows", nargs="+", type=int, default=[1], help="query rows N (1: a decode step)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline-attnc", help="another attnc binary, timed in the same alternation")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(f"# decode steps, attnc vs PyTorch {torch.__version__}: B=1 f32, {args.threads} threads, best of {args.rounds} alternating rounds")
    print("# ratio = PyTorch time / attnc time (> 1: attnc is faster)")
    for shape in args.shapes:
        h, d, m = (int(x) for x in shape.split("x"))
        for n in args.rows:
            best = {"torch": float("inf"), "attnc": float("inf"), "base": float("inf")}
            for _ in range(args.rounds):
                best["torch"] = min(best["torch"], torch_ms(torch, n, h, d, m, args.runs))
                best["attnc"] = min(best["attnc"], attnc_ms(ATTNC, n, h, d, m, args.threads, args.runs))
                if args.baseline_attnc:
                    best["base"] = min(best["base"], attnc_ms(args.baseline_attnc, n, h, d, m, args.threads, args.runs))
            line = f"N={n:<3} H={h:<3} D={d:<4} M={m:<6} torch {best['torch']:8.3f} ms  attnc {best['attnc']:8.3f} ms  ratio {best['torch'] / best['attnc']:.2f}"
            if args.baseline_attnc:
                line += f"  (baseline {best['base']:.3f} ms, ratio {best['torch'] / best['base']:.2f})"
            print(line, flush=True)

if __name__ == "__main__":
    main()
