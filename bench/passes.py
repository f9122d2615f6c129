#!/usr/bin/env python3
"""What the optimization passes buy, measured in one run on one machine (stdlib only).

Every row runs `attnc bench` (release build) and the ratios compare rows of the same run:

  lowrank   alibi.attn with the exact low-rank rewrite (FlashBias) against the same spec with
            the rewrite off (`--opt lowrank=off`: the bias computed per pair), and against
            dense_bias.attn (the ALiBi values given as a dense [B,H,N,M] tensor, which has no
            mask to skip), at N = 4096.
  sparsity  sliding window 256 + 4 sinks (bench/specs/sliding_window_all.attn) and
            power_attention at N = 8192, neighborhood_2d on its 32×32 grid (N = 1024):
            time against (dense time × live-tile fraction), the dense time being sdpa_causal
            at the same shape (sdpa for neighborhood_2d, which is not causal) and the
            fractions those of `attnc explain` at the tile sizes the cost model picks; a
            ratio ≤ 1.5 means the work scales with the live tiles. The same against the
            live-pair fraction (stricter: partial tiles count only their live pairs).
  approx    dense_bias.attn on inputs whose bias holds ALiBi values (written by this script
            to a safetensors file), exact against `--approx-bias 1e-3` (FlashBias,
            approximate: factored to the rank that keeps the max error within 1e-3), at
            N = 2048, with alibi.attn (the exact low-rank form, causal) for reference.
  linear    retnet and gla: the chunked algorithm against the quadratic kernels at N = 8192
            (`--chunk 0`), and the chunked time from N = 2048 to 16384 (linear growth: time
            per key about constant).

Run (after `cargo build --release`):  python3 bench/passes.py [--threads 2] [--quick]
`--quick` uses smaller shapes (a smoke test of the script, not the targets' shapes).
"""

import argparse
import array
import json
import os
import random
import re
import struct
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATTNC = os.path.join(ROOT, "target", "release", "attnc")


def bench(spec, dims, *flags, runs=3, threads=2):
    where = ["--input", dims] if dims.endswith(".safetensors") else ["--dims", dims]
    cmd = [ATTNC, "bench", spec, *where, "--runs", str(runs), "--threads", str(threads), *flags]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr}")
    t = float(re.search(r"time\s+median ([0-9.]+) ms", out.stdout).group(1))
    live = float(re.search(r"\(([0-9.]+)% of pairs live\)", out.stdout).group(1))
    gflops = float(re.search(r"-> ([0-9.]+) GFLOP/s", out.stdout).group(1))
    label = out.stdout.splitlines()[0].split("[", 1)[1].split(";")[0]
    print(f"  {os.path.basename(spec):<26} {dims:<38} {' '.join(flags):<18} {t:10.2f} ms {gflops:7.1f} GFLOP/s  {live:5.1f}% live  [{label}]", flush=True)
    return t, live


def write_safetensors(path, tensors):
    """tensors: name -> (shape, array('f')); little-endian f32, the safetensors layout."""
    header, offset, blobs = {}, 0, []
    for name, (shape, data) in tensors.items():
        if sys.byteorder != "little":
            data = array.array("f", data)
            data.byteswap()
        raw = data.tobytes()
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    head = json.dumps(header).encode()
    head += b" " * ((8 - len(head) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)


def alibi_dense_inputs(path, h, n, d):
    """q, k, v uniform in [-1, 1) and bias[0, hh, i, j] = -slope_hh · (i − j) (ALiBi values)."""
    rnd = random.Random(0)
    qkv = lambda: array.array("f", (rnd.uniform(-1, 1) for _ in range(h * n * d)))
    slopes = [2 ** (-8 * (hh + 1) / h) for hh in range(h)]
    bias = array.array("f", bytes(4 * h * n * n))
    for hh in range(h):
        for i in range(n):
            row = (hh * n + i) * n
            bias[row:row + n] = array.array("f", (-slopes[hh] * (i - j) for j in range(n)))
    write_safetensors(path, {"q": ((1, h, n, d), qkv()), "k": ((1, h, n, d), qkv()), "v": ((1, h, n, d), qkv()), "bias": ((1, h, n, n), bias)})


def live_tiles(spec, dims):
    """The live-tile fraction (%) at the tile size the cost model picks (`attnc explain`)."""
    out = subprocess.run([ATTNC, "explain", spec, "--dims", dims], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"failed: attnc explain {spec}\n{out.stderr}")
    return float(re.search(r"([0-9.]+)% live", out.stdout).group(1))


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

    print("approx: a dense bias holding ALiBi values, exact and factored within 1e-3")
    n = 512 if q else 2048
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "alibi_dense.safetensors")
        alibi_dense_inputs(path, 8, n, 64)
        t_exact, _ = bench(ex("dense_bias"), path, **kw)
        t_approx, _ = bench(ex("dense_bias"), path, "--approx-bias", "1e-3", **kw)
    rows.append(("dense_bias (ALiBi values) factored within 1e-3 vs exact", f"N={n}", t_exact / t_approx, "(FlashBias approximate)"))

    print("sparsity: time against dense time × live fraction (of tiles, and of pairs)")
    n = 2048 if q else 8192
    d = f"B=1,H=8,G=8,N={n},M={n},D=64,Dv=64"
    dc = d.replace(",G=8", "")
    t_causal, live_causal = bench(ex("sdpa_causal"), dc, **kw)
    tiles_causal = live_tiles(ex("sdpa_causal"), dc)
    cases = [(os.path.join("bench", "specs", "sliding_window_all.attn"), d, t_causal, tiles_causal, live_causal, "sdpa_causal")]
    cases.append((ex("power_attention"), d, t_causal, tiles_causal, live_causal, "sdpa_causal"))
    d1 = "B=1,H=8,G=8,N=1024,M=1024,D=64,Dv=64"
    t_dense1k, live_dense = bench(ex("sdpa"), d1.replace(",G=8", ""), **kw)
    cases.append((ex("neighborhood_2d"), d1, t_dense1k, 100.0, live_dense, "sdpa"))
    for spec, dims, t_base, tiles_base, pairs_base, base in cases:
        t, live = bench(spec, dims, **kw)
        tiles = live_tiles(spec, dims)
        name = os.path.basename(spec)[:-5]
        shape = "N=" + re.search(r"N=([0-9]+)", dims).group(1)
        rows.append((f"{name} vs {base} × live-tile fraction ({tiles:.1f}% / {tiles_base:.1f}%)", shape, t / (t_base * tiles / tiles_base), "≤ 1.5"))
        rows.append((f"{name} vs {base} × live-pair fraction ({live:.1f}% / {pairs_base:.1f}%)", shape, t / (t_base * live / pairs_base), "(stricter)"))

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
