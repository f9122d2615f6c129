#!/usr/bin/env python3
"""Side-by-side CPU benchmark: attnc against PyTorch on the same machine, in one run.

Baselines (each variant gets those that can express it):
  sdpa    torch.nn.functional.scaled_dot_product_attention (sdpa, sdpa_causal, gqa_causal)
  flex    FlexAttention compiled for CPU (torch.compile(flex_attention)) where it can express
          the variant (causal, alibi, sliding_window_sink, document_mask, prefix_lm, softcap,
          dense_bias)
  eager   plain PyTorch with the score matrix materialized (every Tier A softmax variant)

Both sides use the same thread count (default 2), f32 and the same inputs: the tensors
PyTorch gets (4 contiguous documents for document_mask, the same block lists, ...) are
written to a safetensors file that `attnc bench --input` reads. GFLOP/s count useful work
only (4·D FLOPs per unmasked (query, key) pair; attnc's `bench` reports the count and the
same count is used for PyTorch). Ratios > 1 mean attnc is faster.

Shared machines are noisy (the same run can take 1.5x as long a minute later), so the two
sides are timed in alternation, `--rounds` times, each a median of `--runs`; the table
keeps each side's best round.

The first line gives the host's FMA peak at its widest vector width (`attnc peak`, measured
in the same run on the same threads) and each attnc row its fraction of it.

Set up (once; about 3 GB of wheels, not part of CI):
  python3 -m venv .venv-bench && .venv-bench/bin/pip install torch==2.15.0 numpy
Run (after `cargo build --release`):
  .venv-bench/bin/python bench/compare_torch.py [--n 1024 2048 4096] [--threads 2] [--rounds 3] [--variants sdpa alibi ...]
Before and after a change (an earlier build copied aside), alternating in one run:
  .venv-bench/bin/python bench/compare_torch.py --baseline-attnc /tmp/attnc-before --no-flex --no-eager --n 2048
"""

import argparse
import json
import math
import os
import re
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATTNC = os.path.join(ROOT, "target", "release", "attnc")

SOFTMAX_A = [
    "sdpa", "sdpa_causal", "gqa_causal", "sliding_window_sink", "alibi", "document_mask", "prefix_lm",
    "dense_bias", "softcap", "sink_softmax", "clipped_softmax", "swin_window", "neighborhood_2d",
    "power_attention", "block_sparse", "axial_rows",
]
FLEX = {"sdpa_causal", "alibi", "sliding_window_sink", "document_mask", "prefix_lm", "softcap", "dense_bias"}
SDPA = {"sdpa", "sdpa_causal", "gqa_causal"}


def first_line(e):
    """An exception's first line (compiler errors carry pages of log)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def spec_dims(spec):
    """The names on the spec's `dims` line (`G = H`, a dim with a default, gives `G`)."""
    for line in open(os.path.join(ROOT, "examples", spec + ".attn")):
        line = line.split("#")[0].strip()
        if line.startswith("dims "):
            return [d.split("=")[0].strip() for d in line[5:].split(",")]
    return []


def spec_inputs(spec):
    """The names on the spec's `input` lines."""
    names = []
    for line in open(os.path.join(ROOT, "examples", spec + ".attn")):
        m = re.match(r"\s*input\s+(\w+)\s*:", line.split("#")[0])
        if m:
            names.append(m.group(1))
    return names


def write_safetensors(path, tensors):
    """tensors: name -> torch tensor (f32 or i32), written little-endian in the safetensors
    layout (8-byte header length, JSON header, data)."""
    header, blobs, off = {}, [], 0
    for name, t in tensors.items():
        t = t.contiguous()
        dtype = {"torch.float32": "F32", "torch.int32": "I32"}[str(t.dtype)]
        data = t.numpy().astype("<f4" if dtype == "F32" else "<i4").tobytes()
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def attnc_bench(spec, dims, threads, runs, inputs=None, exe=ATTNC):
    where = ["--input", inputs, "--dims", dims] if inputs else ["--dims", dims]
    cmd = [exe, "bench", os.path.join(ROOT, "examples", spec + ".attn"), *where, "--threads", str(threads), "--runs", str(runs)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"attnc bench {spec} failed: {out.stderr.strip()}")
    text = out.stdout
    ms = float(re.search(r"median ([0-9.]+) ms", text).group(1))
    gflop = float(re.search(r"useful\s+([0-9.]+) GFLOP", text).group(1))
    live = float(re.search(r"\(([0-9.]+)% of pairs live\)", text).group(1))
    mem = float(re.search(r"peak ([0-9.]+) MiB", text).group(1))
    comp = float(re.search(r"compile\s+([0-9.]+) ms", text).group(1))
    return ms, gflop, live, mem, comp


def median_time(fn, runs):
    fn()  # warm-up (and compile)
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2] * 1e3


def make_inputs(torch, spec, B, H, G, N, D):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, N, D, generator=g)
    k = torch.randn(B, G, N, D, generator=g)
    v = torch.randn(B, G, N, D, generator=g)
    extra = {
        "slope": torch.rand(H, generator=g),
        "streaming": torch.ones(H, dtype=torch.int32),
        "seg": torch.arange(N).div(N // 4, rounding_mode="floor").clamp(max=3).repeat(B, 1).to(torch.int32),
        "prefix": torch.full((B,), N // 4, dtype=torch.int32),
        "bias": torch.randn(B, H, N, N, generator=g) if spec == "dense_bias" else None,
        "sink": torch.randn(H, generator=g),
        "gate": torch.randn(B, H, N, generator=g),
        "rpb": torch.randn(H, 225, generator=g),
        "blocks": torch.randint(-1, max(1, N // 64), (B, H, (N + 63) // 64, 2), generator=g, dtype=torch.int32),
    }
    return q, k, v, extra


def masks_and_bias(torch, spec, N, H, extra):
    """Materialized [H or 1, N, N] boolean mask and float bias (None when absent)."""
    i = torch.arange(N).view(N, 1)
    j = torch.arange(N).view(1, N)
    causal = j <= i
    if spec in ("sdpa", "dense_bias", "clipped_softmax"):
        return None, (extra["bias"] if spec == "dense_bias" else None)
    if spec in ("sdpa_causal", "gqa_causal", "softcap", "sink_softmax"):
        return causal, None
    if spec == "alibi":
        return causal, -extra["slope"].view(H, 1, 1) * (i - j).float()
    if spec == "sliding_window_sink":
        win = causal & ((i - j < 256) | (j < 4))
        return torch.where(extra["streaming"].view(H, 1, 1) != 0, win, causal), None
    if spec == "document_mask":
        s = extra["seg"][0]
        return causal & (s.view(N, 1) == s.view(1, N)), None
    if spec == "prefix_lm":
        return causal | (j < int(extra["prefix"][0])), None
    if spec == "axial_rows":
        return (i // 16) == (j // 16), None
    if spec == "power_attention":
        a, c = i // 64, j // 64
        d = a - c
        return causal & ((d == 0) | ((d > 0) & ((d & (d - 1)) == 0))), None
    if spec == "block_sparse":
        a, c = i // 64, j // 64
        lst = extra["blocks"][0, :, :, :]  # [H, NB, K]
        listed = (lst[:, a.view(-1), :].unsqueeze(-1) == c.view(1, 1, 1, -1).repeat(1, 1, 1, 1)).any(2)
        return causal & ((a == c) | listed.view(H, N, N)), None
    if spec == "swin_window":
        def rolled(x):
            return ((x // 16 - 4) % 16, (x % 16 - 4) % 16)
        def region(x):
            return torch.where(x < 8, 0, torch.where(x < 12, 1, 2))
        ri, ci = rolled(i % 256)
        rj, cj = rolled(j % 256)
        m = (ri // 8 == rj // 8) & (ci // 8 == cj // 8) & (region(ri) == region(rj)) & (region(ci) == region(cj))
        idx = ((ri - rj + 7) * 15 + (ci - cj + 7)).clamp(0, 224)
        return m, extra["rpb"][:, idx]
    if spec == "neighborhood_2d":
        def near(x, y, L):
            g = x % 2
            glen = (L - g + 1) // 2
            start = (x // 2 - 3).clamp(min=0)
            start = torch.minimum(start, glen - 7)
            return (y % 2 == g) & (start <= y // 2) & (y // 2 < start + 7)
        return near(i // 32, j // 32, 32) & near(i % 32, j % 32, 32), None
    raise KeyError(spec)


def eager(torch, spec, q, k, v, extra, H, G):
    N, D = q.shape[2], q.shape[3]
    if G != H:
        k = k.repeat_interleave(H // G, 1)
        v = v.repeat_interleave(H // G, 1)
    mask, bias = masks_and_bias(torch, spec, N, H, extra)

    def run():
        s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        if spec == "softcap":
            s = 50.0 * torch.tanh(s / 50.0)
        if bias is not None:
            s = s + bias
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        if spec == "sink_softmax":
            sink = extra["sink"].view(1, H, 1, 1).expand(s.shape[0], H, N, 1)
            p = torch.softmax(torch.cat([s, sink], -1), -1)[..., :-1]
        else:
            p = torch.softmax(s, -1)
        if spec == "clipped_softmax":
            p = (1.003 * p - 0.003).clamp(0, 1)
        o = p @ v
        if spec == "clipped_softmax":
            o = o * torch.sigmoid(extra["gate"]).unsqueeze(-1)
        return o

    return run


def flex(torch, spec, q, k, v, extra, H, device="cpu"):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    N = q.shape[2]
    slope, streaming, seg, prefix = extra["slope"], extra["streaming"], extra["seg"], int(extra["prefix"][0])
    dense = extra["bias"]

    def causal(b, h, i, j):
        return j <= i

    mask_mod, score_mod = None, None
    if spec in ("sdpa_causal", "alibi", "softcap"):
        mask_mod = causal
    if spec == "alibi":
        def score_mod(s, b, h, i, j):
            return s - slope[h] * (i - j)
    if spec == "softcap":
        def score_mod(s, b, h, i, j):
            return 50.0 * torch.tanh(s / 50.0)
    if spec == "sliding_window_sink":
        def mask_mod(b, h, i, j):
            return (j <= i) & ((streaming[h] == 0) | (i - j < 256) | (j < 4))
    if spec == "document_mask":
        def mask_mod(b, h, i, j):
            return (j <= i) & (seg[b, i] == seg[b, j])
    if spec == "prefix_lm":
        def mask_mod(b, h, i, j):
            return (j <= i) | (j < prefix)
    if spec == "dense_bias":
        def score_mod(s, b, h, i, j):
            return s + dense[b, h, i, j]
    block_mask = create_block_mask(mask_mod, q.shape[0], H, N, N, device=device) if mask_mod else None
    # A fresh compile per variant: dynamo's recompile limit would otherwise silently fall
    # back to the unfused implementation after a few variants.
    torch._dynamo.reset()
    compiled = torch.compile(flex_attention)

    def run():
        return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask)

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="alternations of attnc and the baselines; each side keeps its best round")
    ap.add_argument("--variants", nargs="+", default=SOFTMAX_A)
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its first compile takes a while)")
    ap.add_argument("--no-eager", action="store_true")
    ap.add_argument(
        "--baseline-attnc",
        metavar="PATH",
        help="also time this other attnc build (e.g. one from before a change) as a baseline, alternating with the others on the same inputs",
    )
    args = ap.parse_args()
    if not os.path.exists(ATTNC):
        sys.exit(f"{ATTNC} not found: run `cargo build --release` first")
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    B, H, D = 1, 8, 64
    print(f"# attnc vs PyTorch {torch.__version__}, B={B} H={H} D={D} f32, {args.threads} threads, best of {args.rounds} alternating rounds, each a median of {args.runs}")
    # The host's FMA peak at its widest vector width, measured now on the same threads.
    peak_line = subprocess.run([ATTNC, "peak", "--threads", str(args.threads)], capture_output=True, text=True, check=True).stdout.strip()
    peak = float(re.search(r"fma peak ([0-9.]+) GFLOP/s", peak_line).group(1))
    print(f"# {peak_line}; the `peak` column is each attnc row's GFLOP/s as a fraction of it")
    tmp = tempfile.mkdtemp(prefix="attnc-compare-")
    print(f"{'variant':22} {'N':>5} {'attnc ms':>9} {'GFLOP/s':>8} {'base':>6} {'base ms':>9} {'GFLOP/s':>8} {'ratio':>6}")
    for N in args.n:
        for spec in args.variants:
            G = 2 if spec == "gqa_causal" else H
            values = {"B": B, "H": H, "G": G, "N": N, "M": N, "D": D, "Dv": D, "K": 2}
            dims = ",".join(f"{d}={values[d]}" for d in spec_dims(spec))
            q, k, v, extra = make_inputs(torch, spec, B, H, G, N, D)
            # attnc reads the tensors PyTorch gets (random ones only for names PyTorch has not).
            given = {"q": q, "k": k, "v": v, **{n: t for n, t in extra.items() if t is not None}}
            names = spec_inputs(spec)
            path = None
            if all(n in given for n in names):
                path = os.path.join(tmp, f"{spec}-{N}.safetensors")
                write_safetensors(path, {n: given[n] for n in names})
            baselines = []
            if spec in SDPA:
                causal = spec != "sdpa"
                if G != H:
                    baselines.append(("sdpa", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)))
                else:
                    baselines.append(("sdpa", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)))
            if spec in FLEX and not args.no_flex:
                try:
                    baselines.append(("flex", flex(torch, spec, q, k, v, extra, H)))
                except Exception as e:  # noqa: BLE001 - report and go on
                    print(f"{'':22} {N:>5} flex unavailable: {first_line(e)}")
            if not args.no_eager:
                baselines.append(("eager", eager(torch, spec, q, k, v, extra, H, G)))
            best, failed, ms = {}, {}, None
            for _ in range(args.rounds):
                try:
                    r = attnc_bench(spec, dims, args.threads, args.runs, path)
                except RuntimeError as e:
                    print(f"{spec:22} {N:>5} attnc failed: {e}")
                    break
                if ms is None or r[0] < ms:
                    ms, gflop, live, mem, comp = r
                if args.baseline_attnc:
                    try:
                        rb = attnc_bench(spec, dims, args.threads, args.runs, path, exe=args.baseline_attnc)
                        best["attnc@base"] = min(best.get("attnc@base", rb[0]), rb[0])
                    except RuntimeError as e:
                        failed["attnc@base"] = first_line(e)
                for name, fn in baselines:
                    if name in failed:
                        continue
                    with torch.inference_mode():
                        try:
                            bms = median_time(fn, args.runs)
                        except Exception as e:  # noqa: BLE001
                            failed[name] = first_line(e)
                            continue
                    best[name] = min(best.get(name, bms), bms)
            if ms is None:
                continue
            inputs = "same inputs" if path else "random inputs"
            print(f"{spec:22} {N:>5} {ms:9.2f} {gflop / ms * 1e3:8.1f}   (peak {gflop / ms * 1e3 / peak:.0%}; compile {comp:.1f} ms, {live:.1f}% live, {mem:.1f} MiB extra, {inputs})")
            shown = [n for n, _ in baselines] + (["attnc@base"] if args.baseline_attnc else [])
            for name in shown:
                if name in failed:
                    print(f"{'':22} {N:>5} {name} failed: {failed[name]}")
                    continue
                bms = best[name]
                print(f"{'':22} {N:>5} {'':9} {'':8} {name:>6} {bms:9.2f} {gflop / bms * 1e3:8.1f} {bms / ms:6.2f}")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
