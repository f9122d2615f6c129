#!/usr/bin/env python3
"""GPU benchmark: attnc's PTX backend (`attnc bench --backend ptx`) against PyTorch on the
same NVIDIA GPU, in one run, bf16.

Baselines:
  sdpa    torch.nn.functional.scaled_dot_product_attention with the FlashAttention backend
          forced (sdpa, sdpa_causal)
  flex    FlexAttention compiled with torch.compile (sdpa_causal, alibi,
          sliding_window_sink, document_mask, softcap)

attnc runs each example with its float inputs declared bf16 (the tensor-core kernel:
mma.sync m16n8k16, f32 accumulation); both sides read the same numbers (the inputs are
rounded to bf16 and written to a safetensors file `attnc bench --input` reads). Times are
device times: attnc's between CUDA events around its launches, inputs already on the GPU;
PyTorch's likewise (CUDA events, after a warm-up). TFLOP/s count useful work (4·D FLOPs
per unmasked pair, the count `attnc bench` reports). Sides alternate `--rounds` times;
each keeps its best round. Ratios > 1 mean attnc is faster.

Set up (once, on the GPU machine):
  python3 -m venv .venv-gpu && .venv-gpu/bin/pip install torch numpy
Run (after `cargo build --release`):
  .venv-gpu/bin/python bench/compare_gpu.py [--n 1024 4096 16384] [--d 64 128] [--variants sdpa alibi ...]
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_torch import ROOT, first_line, flex, make_inputs, spec_dims, spec_inputs, write_safetensors  # noqa: E402

ATTNC = os.path.join(ROOT, "target", "release", "attnc")
VARIANTS = ["sdpa", "sdpa_causal", "alibi", "sliding_window_sink", "document_mask", "softcap"]
FLEX = {"sdpa_causal", "alibi", "sliding_window_sink", "document_mask", "softcap"}
SDPA = {"sdpa", "sdpa_causal"}


def bf16_spec(spec, tmp):
    """The example with its f32 inputs declared bf16."""
    out = os.path.join(tmp, spec + ".attn")
    with open(os.path.join(ROOT, "examples", spec + ".attn")) as f, open(out, "w") as g:
        for line in f:
            if line.lstrip().startswith("input "):
                line = line.replace(": f32[", ": bf16[", 1)
            g.write(line)
    return out


def attnc_bench(path, dims, runs, inputs):
    cmd = [ATTNC, "bench", path, "--backend", "ptx", "--input", inputs, "--dims", dims, "--runs", str(runs)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip())
    ms = float(re.search(r"median ([0-9.]+) ms", out.stdout).group(1))
    gflop = float(re.search(r"useful\s+([0-9.]+) GFLOP", out.stdout).group(1))
    form = re.search(r"ptx, ([^;]*);", out.stdout)
    return ms, gflop, form.group(1) if form else "?"


def cuda_median_ms(torch, fn, runs):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--d", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--b", type=int, default=4)
    ap.add_argument("--h", type=int, default=16)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=VARIANTS)
    ap.add_argument("--no-flex", action="store_true")
    args = ap.parse_args()
    if not os.path.exists(ATTNC):
        sys.exit(f"{ATTNC} not found: run `cargo build --release` first")
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not torch.cuda.is_available():
        sys.exit("no CUDA device for PyTorch")
    B, H = args.b, args.h
    print(f"# attnc (ptx) vs PyTorch {torch.__version__} on {torch.cuda.get_device_name()}, B={B} H={H} bf16, best of {args.rounds} alternating rounds, each a median of {args.runs}")
    print(f"{'variant':20} {'N':>6} {'D':>4} {'attnc ms':>9} {'TFLOP/s':>8} {'base':>5} {'base ms':>9} {'TFLOP/s':>8} {'ratio':>6}  attnc kernel")
    tmp = tempfile.mkdtemp(prefix="attnc-gpu-")
    for D in args.d:
        for N in args.n:
            for spec in args.variants:
                values = {"B": B, "H": H, "G": H, "N": N, "M": N, "D": D, "Dv": D, "K": 2}
                dims = ",".join(f"{d}={values[d]}" for d in spec_dims(spec))
                q, k, v, extra = make_inputs(torch, spec, B, H, H, N, D)
                q, k, v = (x.bfloat16().float() for x in (q, k, v))
                given = {"q": q, "k": k, "v": v, **{n: t for n, t in extra.items() if t is not None}}
                names = spec_inputs(spec)
                path = os.path.join(tmp, f"{spec}-{N}-{D}.safetensors")
                write_safetensors(path, {n: given[n].bfloat16().float() if given[n].is_floating_point() else given[n] for n in names})
                qc, kc, vc = (x.cuda().bfloat16() for x in (q, k, v))
                ex = {n: (t.cuda() if t is not None else None) for n, t in extra.items()}
                baselines = []
                if spec in SDPA:
                    causal = spec != "sdpa"

                    def run_sdpa(causal=causal):
                        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                            return F.scaled_dot_product_attention(qc, kc, vc, is_causal=causal)

                    baselines.append(("sdpa", run_sdpa))
                if spec in FLEX and not args.no_flex:
                    try:
                        baselines.append(("flex", flex(torch, spec, qc, kc, vc, ex, H, device="cuda")))
                    except Exception as e:  # noqa: BLE001 - report and go on
                        print(f"{spec:20} {N:>6} {D:>4} flex unavailable: {first_line(e)}")
                spec_path = bf16_spec(spec, tmp)
                best, ms, form = {}, None, "?"
                for _ in range(args.rounds):
                    try:
                        r = attnc_bench(spec_path, dims, args.runs, path)
                    except RuntimeError as e:
                        print(f"{spec:20} {N:>6} {D:>4} attnc failed: {first_line(e)}")
                        break
                    if ms is None or r[0] < ms:
                        ms, gflop, form = r
                    for name, fn in baselines:
                        try:
                            t = cuda_median_ms(torch, fn, args.runs)
                            best[name] = min(best.get(name, t), t)
                        except Exception as e:  # noqa: BLE001
                            print(f"{spec:20} {N:>6} {D:>4} {name} failed: {first_line(e)}")
                if ms is None:
                    continue
                tf = gflop / ms  # GFLOP per ms = TFLOP/s
                if not best:
                    print(f"{spec:20} {N:>6} {D:>4} {ms:9.3f} {tf:8.1f} {'-':>5} {'-':>9} {'-':>8} {'-':>6}  {form}")
                for name, t in sorted(best.items()):
                    print(f"{spec:20} {N:>6} {D:>4} {ms:9.3f} {tf:8.1f} {name:>5} {t:9.3f} {gflop / t:8.1f} {t / ms:6.2f}  {form}")
                sys.stdout.flush()


if __name__ == "__main__":
    main()
