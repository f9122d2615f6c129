#!/usr/bin/env python3
"""The cost of calling attnc from Python: the same kernel timed through the Python package
(NumPy in, NumPy out; and torch in, torch out when torch is installed) and by `attnc bench`
(the kernel alone, in-process), alternating, each side keeping its best round.

Run (after `cargo build --release` and `pip install ./python`):
  python bench/python_overhead.py [--rounds 5] [--threads 2]
"""

import argparse
import os
import re
import subprocess
import sys
import time

import numpy as np

import attnc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATTNC = os.path.join(ROOT, "target", "release", "attnc")

CASES = [
    ("sdpa", {"B": 1, "H": 8, "N": 1024, "M": 1024, "D": 64, "Dv": 64}, "prefill, N=1024"),
    ("sdpa_causal", {"B": 1, "H": 8, "N": 1024, "M": 1024, "D": 64, "Dv": 64}, "causal prefill, N=1024"),
    ("sdpa", {"B": 1, "H": 8, "N": 1, "M": 1024, "D": 64, "Dv": 64}, "decode step, N=1, M=1024"),
    ("mla_decode", None, "MLA decode step, N=1, M=4096"),
]


def cli_ms(spec, dims, threads, runs):
    d = ",".join(f"{k}={v}" for k, v in dims.items())
    out = subprocess.run([ATTNC, "bench", os.path.join(ROOT, "examples", spec + ".attn"), "--dims", d, "--threads", str(threads), "--runs", str(runs)], capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr)
    # The fastest sample: the kernel's own time with the least interference.
    return float(re.search(r"min ([0-9.]+)", out.stdout).group(1))


def py_ms(fn, runs):
    fn()
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None
    print(f"# attnc {attnc.__version__} on {attnc.device()}, {args.threads} threads, best of {args.rounds} alternating rounds of {args.runs} calls")
    print(f"{'case':32} {'kernel ms':>10} {'numpy ms':>10} {'overhead':>14} {'torch ms':>10} {'overhead':>14}")
    for spec, dims, label in CASES:
        kern = attnc.compile(os.path.join(ROOT, "examples", spec + ".attn"), threads=args.threads)
        if dims is None:
            dims = {k: v for k, v in {"B": 1, "H": 16, "N": 1, "M": 4096, "D": 64, "Dv": 64, "R": 32, "G": 1}.items() if k in kern._k.dims()}
        ins = kern.random_inputs(**dims)
        tins = {n: torch.from_numpy(a) for n, a in ins.items()} if torch else None
        cli, py, pt = float("inf"), float("inf"), float("inf")
        for _ in range(args.rounds):
            cli = min(cli, cli_ms(spec, dims, args.threads, args.runs))
            py = min(py, py_ms(lambda: kern(**ins), args.runs))
            if torch:
                pt = min(pt, py_ms(lambda: kern(**tins), args.runs))
        over = lambda x: f"{(x - cli) * 1e3:+8.1f} µs {100 * (x - cli) / cli:+5.1f}%"  # noqa: E731
        tcol = f"{pt:10.3f} {over(pt):>14}" if torch else f"{'-':>10} {'-':>14}"
        print(f"{label:32} {cli:10.3f} {py:10.3f} {over(py):>14} {tcol}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
