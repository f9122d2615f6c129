#!/usr/bin/env python3
"""What the optimization passes buy, measured in one run on one machine (stdlib only).

Every row runs `attnc bench` (release build) and the ratios compare rows of the same run:

  lowrank   alibi.attn with the exact low-rank rewrite (FlashBias) against the same spec with
            the rewrite off (`--opt lowrank=off`: the bias computed per pair), and against
            dense_bias.attn (the ALiBi values given as a dense [B,H,N,M] tensor, which has no
            mask to skip), at N = 4096.
  sparsity  sliding window 256 + 4 sinks (bench/specs/sliding_window_all.attn) and
            power_attention at N = 8192, neighborhood_2d on its 32×32 grid (N = 1024):
            time against (dense time × live fraction), the dense time being sdpa_causal at
            the same shape (sdpa for neighborhood_2d, which is not causal); a ratio ≤ 1.5
            means the work scales with the live tiles.
  linear    retnet and gla: the chunked algorithm against the quadratic kernels at N = 8192
            (`--chunk 0`), and the chunked time from N = 2048 to 16384 (linear growth: time
            per key about constant).

Run (after `cargo build --release`):  python3 bench/passes.py [--threads 2] [--quick]
`--quick` uses smaller shapes (a smoke test of the script, not the targets' shapes).
"""

import argparse
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATTNC = os.path.join(ROOT, "target", "release", "attnc")


def bench(spec, dims, *flags, runs=3, threads=2):
    cmd = [ATTNC, "bench", spec, "--dims", dims, "--runs", str(runs), "--threads", str(threads), *flags]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr}")
    t = float(re.search(r"time\s+median ([0-9.]+) ms", out.stdout).group(1))
    live = float(re.search(r"\(([0-9.]+)% of pairs live\)", out.stdout).group(1))
    gflops = float(re.search(r"-> ([0-9.]+) GFLOP/s", out.stdout).group(1))
    label = out.stdout.splitlines()[0].split("[", 1)[1].split(";")[0]
    print(f"  {os.path.basename(spec):<26} {dims:<38} {' '.join(flags):<18} {t:10.2f} ms {gflops:7.1f} GFLOP/s  {live:5.1f}% live  [{label}]", flush=True)
    return t, live


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if not os.path.exists(ATTNC):
        sys.exit("build first: cargo build --release")
    q = a.quick
    kw = {"threads": a.threads}
    ex = lambda n: os.path.join("examples", n + ".attn")
    rows = []

    print("lowrank: ALiBi as extra dot channels")
    n = 1024 if q else 4096
    d = f"B=1,H=8,G=8,N={n},M={n},D=64,Dv=64"
    t_lr, _ = bench(ex("alibi"), d, **kw)
    t_off, _ = bench(ex("alibi"), d, "--opt", "lowrank=off", **kw)
    t_dense, _ = bench(ex("dense_bias"), d, runs=2, **kw)
    rows.append(("alibi low-rank vs ALiBi values as dense_bias", f"N={n}", t_dense / t_lr, "≥ 1.5×"))
    rows.append(("alibi low-rank vs per-pair bias (lowrank=off)", f"N={n}", t_off / t_lr, "(isolates the rewrite)"))

    print("sparsity: time against dense time × live fraction")
    n = 2048 if q else 8192
    d = f"B=1,H=8,G=8,N={n},M={n},D=64,Dv=64"
    t_causal, live_causal = bench(ex("sdpa_causal"), d.replace(",G=8", ""), **kw)
    for spec in [os.path.join("bench", "specs", "sliding_window_all.attn"), ex("power_attention")]:
        t, live = bench(spec, d, **kw)
        rows.append((f"{os.path.basename(spec)[:-5]} vs sdpa_causal × live fraction", f"N={n}", t / (t_causal * live / live_causal), "≤ 1.5"))
    d = "B=1,H=8,G=8,N=1024,M=1024,D=64,Dv=64"
    t_dense1k, live_dense = bench(ex("sdpa"), d.replace(",G=8", ""), **kw)
    t, live = bench(ex("neighborhood_2d"), d, **kw)
    rows.append(("neighborhood_2d vs sdpa × live fraction", "N=1024", t / (t_dense1k * live / live_dense), "≤ 1.5"))

    print("linear: chunked against quadratic, and growth in N")
    ns = [512, 1024, 2048] if q else [2048, 4096, 8192, 16384]
    nq = 2048 if q else 8192
    growth = {}
    for spec, heads in [("retnet", 8), ("gla", 2)]:
        extra = ",G=8" if spec == "retnet" else ""
        h = f"H={heads}" if spec == "gla" else "H=8"
        d = lambda n: f"B=1,{h}{extra},N={n},M={n},D=64,Dv=64"
        t_quad, _ = bench(ex(spec), d(nq), "--chunk", "0", runs=1, **kw)
        t_chunk, _ = bench(ex(spec), d(nq), "--chunk", "64", **kw)
        rows.append((f"{spec} chunked vs quadratic ({h})", f"N={nq}", t_quad / t_chunk, "≥ 5×"))
        growth[spec] = [(n, bench(ex(spec), d(n), "--chunk", "64", **kw)[0]) for n in ns]

    print()
    print("| measurement | shape | ratio | target |")
    print("|---|---|---|---|")
    for name, shape, r, target in rows:
        print(f"| {name} | {shape} | {r:.2f} | {target} |")
    print()
    print("| N | " + " | ".join(f"{s} chunked (ms) | {s} µs per key" for s in growth) + " |")
    print("|---|" + "---|---|" * len(growth))
    for k, n in enumerate(ns):
        cells = []
        for s in growth:
            t = growth[s][k][1]
            cells += [f"{t:.1f}", f"{1000 * t / n:.2f}"]
        print(f"| {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
