"""The Python package against the reference interpreter, with NumPy and torch, bad input,
zero copies and threads. torch tests are skipped (with the reason) when torch is absent."""

import glob
import os
import threading
import time

import numpy as np
import pytest

import attnc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.attn")))

try:
    import torch

    HAVE_TORCH = True
except ImportError:  # pragma: no cover - depends on the machine
    HAVE_TORCH = False
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed (pip install torch to run the torch tests)")

# Values for whichever of these dims a spec has (N not a multiple of the tile, N != M, G < H).
SMALL = {"B": 1, "H": 2, "G": 1, "N": 37, "M": 45, "D": 16, "Dv": 12, "K": 2, "P": 5, "MP": 3}


def small_dims(kern):
    return {d: SMALL[d] for d in kern._k.dims() if d in SMALL}


def test_every_example_matches_the_reference():
    assert len(EXAMPLES) >= 28
    ran = 0
    for path in EXAMPLES:
        kern = attnc.compile(path)
        try:
            ins = kern.random_inputs(seed=3, **small_dims(kern))
        except ValueError:
            # A spec whose requirements these dims do not meet (N == M, grids): its own dims.
            dims = {**small_dims(kern), "N": 64, "M": 64} if "N" in small_dims(kern) else small_dims(kern)
            try:
                ins = kern.random_inputs(seed=3, **dims)
            except ValueError:
                dims = {**dims, "N": 256, "M": 256, "H": 1, "D": 8, "Dv": 8}
                ins = kern.random_inputs(seed=3, **dims)
        got = kern(**ins)
        want = kern.reference(**ins)
        assert got.shape == want.shape and got.dtype == np.float32, path
        rms = np.sqrt(np.mean(want[np.isfinite(want)] ** 2)) if np.isfinite(want).any() else 1.0
        np.testing.assert_allclose(got, want, atol=2e-4 * max(rms, 1e-3), rtol=2e-3, err_msg=path)
        ran += 1
    assert ran == len(EXAMPLES)


def wgsl_adapter():
    """The WebGPU adapter's name, or None when wgpu finds none here."""
    name = attnc.device("wgsl")
    return None if name == "wgsl:no-adapter" else name


needs_wgsl = pytest.mark.skipif(
    wgsl_adapter() is None and "wgsl" not in os.environ.get("ATTNC_REQUIRE_BACKENDS", ""),
    reason="no WebGPU adapter (install a Vulkan driver, e.g. mesa-vulkan-drivers for lavapipe)",
)


@needs_wgsl
def test_wgsl_backend_matches_the_reference():
    # Causal (tile classes skip tiles), a mask read from data, and a post-map (two passes).
    for name in ["sdpa_causal", "document_mask", "clipped_softmax", "sigmoid_alibi", "sliding_window_sink"]:
        path = os.path.join(ROOT, "examples", f"{name}.attn")
        kern = attnc.compile(path, backend="wgsl")
        assert kern._k.backend == "wgsl"
        dims = small_dims(kern)
        if "M" in dims:
            dims["M"] = dims["N"]  # document_mask and sliding_window_sink require N == M
        ins = kern.random_inputs(seed=5, **dims)
        got = kern(**ins)
        want = kern.reference(**ins)
        rms = np.sqrt(np.mean(want[np.isfinite(want)] ** 2)) if np.isfinite(want).any() else 1.0
        np.testing.assert_allclose(got, want, atol=5e-4 * max(rms, 1e-3), rtol=5e-3, err_msg=name)
        assert "workgroup" in kern.last_run()["kernel"]
    # Fixed options (the tiled kernel, then the row kernel), and the CPU's refused by name.
    causal = os.path.join(ROOT, "examples", "sdpa_causal.attn")
    kern = attnc.compile(causal, backend="wgsl", workgroup=64, channels=4, block_q=16, block_k=32)
    ins = kern.random_inputs(seed=1, **small_dims(kern))
    np.testing.assert_allclose(kern(**ins), kern.reference(**ins), atol=1e-3, rtol=5e-3)
    assert "tiled 16x32, workgroup 64" in kern.last_run()["kernel"]
    kern = attnc.compile(causal, backend="wgsl", tiled=False, workgroup=16, channels=4, block_q=4)
    np.testing.assert_allclose(kern(**ins), kern.reference(**ins), atol=1e-3, rtol=5e-3)
    assert "row kernel, workgroup 16" in kern.last_run()["kernel"]
    with pytest.raises(ValueError, match="`microkernel` is not an option of the wgsl backend"):
        attnc.compile(causal, backend="wgsl", microkernel=0)
    # Linear attention in chunks (several, 8 keys each) on the WGSL backend.
    kern = attnc.compile(os.path.join(ROOT, "examples", "retnet.attn"), backend="wgsl", chunk=8)
    ins = kern.random_inputs(seed=3, B=1, H=2, G=2, N=30, M=30, D=8, Dv=8)
    np.testing.assert_allclose(kern(**ins), kern.reference(**ins), atol=1e-4, rtol=5e-3)
    assert "chunked" in kern.last_run()["kernel"]
    with pytest.raises(ValueError, match="invocations per query row"):
        attnc.compile(causal, backend="wgsl", workgroup=64, block_q=3)
    with pytest.raises(ValueError, match="power of two"):
        attnc.compile(os.path.join(ROOT, "examples", "sdpa_causal.attn"), backend="wgsl", workgroup=48)


def test_ptx_sim_backend_runs_the_tensor_core_kernel_on_bf16_specs():
    # The PTX interpreter: a bf16 spec takes the tensor-core kernel (its stated bf16
    # tolerance), an f32 one the exact row kernel; PTX options are checked by name.
    src = open(os.path.join(ROOT, "examples", "sdpa_causal.attn"), encoding="utf-8").read()
    bf16 = "\n".join(l.replace(": f32[", ": bf16[", 1) if l.lstrip().startswith("input ") else l for l in src.splitlines())
    for text, tol in [(bf16, 8e-3), (src, 5e-4)]:
        kern = attnc.compile(text, backend="ptx-sim")
        assert kern._k.backend == "ptx-sim"
        ins = kern.random_inputs(seed=2, B=1, H=2, N=40, M=40, D=16, Dv=16)
        got, want = kern(**ins), kern.reference(**ins)
        rms = np.sqrt(np.mean(want[want != 0] ** 2))
        np.testing.assert_allclose(got, want, atol=tol * rms, rtol=10 * tol)
    assert attnc.device("ptx-sim") == "ptx-sim:interpreter"
    assert kern.last_run()["tolerance"] is None
    with pytest.raises(ValueError, match="`block_q` is not an option of the ptx-sim backend"):
        attnc.compile(bf16, backend="ptx-sim", block_q=16)
    # An f32 spec at precision bf16: q, k, v rounded on the device, the tensor cores, the
    # stated tolerance.
    kern = attnc.compile(src, backend="ptx-sim", precision="bf16")
    ins = kern.random_inputs(seed=4, B=1, H=1, N=40, M=40, D=16, Dv=16)
    got, want = kern(**ins), kern.reference(**ins)
    assert "tensor-core" in kern.last_run()["kernel"] or "tensor cores" in kern.last_run()["kernel"], kern.last_run()["kernel"]
    atol, rtol = kern.last_run()["tolerance"]
    rms = np.sqrt(np.mean(want[want != 0] ** 2))
    np.testing.assert_allclose(got, want, atol=atol * rms, rtol=rtol)
    with pytest.raises(ValueError, match="precision `tf64`"):
        attnc.compile(src, backend="ptx-sim", precision="tf64")
    with pytest.raises(ValueError, match="`precision` is an option of the ptx"):
        attnc.compile(src, precision="bf16")
    # The linear family's chunked kernel (several chunks of 8 keys).
    kern = attnc.compile(os.path.join(ROOT, "examples", "retnet.attn"), backend="ptx-sim", chunk=8)
    ins = kern.random_inputs(seed=3, B=1, H=2, G=2, N=30, M=30, D=8, Dv=8)
    np.testing.assert_allclose(kern(**ins), kern.reference(**ins), atol=1e-4, rtol=5e-3)
    assert "chunked" in kern.last_run()["kernel"], kern.last_run()["kernel"]


def alibi_inputs(n=64, h=4, seed=0):
    kern = attnc.compile(os.path.join(ROOT, "examples", "alibi.attn"))
    return kern, kern.random_inputs(seed=seed, B=1, H=h, G=h, N=n, M=n, D=16, Dv=16)


def test_contiguous_inputs_are_read_in_place_and_the_output_is_the_callers():
    kern, ins = alibi_inputs()
    out = kern(**ins)
    last = kern.last_run()
    for name, a in ins.items():
        assert last["inputs"][name] == a.ctypes.data, f"{name} was copied"
    assert last["output"] == out.ctypes.data, "the returned array is the buffer the kernel wrote"
    # A non-contiguous or float64 input is converted once (and then is not the caller's).
    q64 = ins["q"].astype(np.float64)
    np.testing.assert_allclose(kern(**{**ins, "q": q64}), out, rtol=1e-6, atol=1e-6)
    assert kern.last_run()["inputs"]["q"] != q64.ctypes.data


def test_bad_input_raises_value_errors_naming_the_tensor():
    kern, ins = alibi_inputs()
    with pytest.raises(ValueError, match="missing input tensor `slope`"):
        kern(q=ins["q"], k=ins["k"], v=ins["v"])
    with pytest.raises(ValueError, match="`sloep` is not an input of alibi"):
        kern(**ins, sloep=ins["slope"])
    with pytest.raises(ValueError, match=r"inputs disagree on dim `D`"):
        kern(**{**ins, "q": ins["q"][..., :15].copy()})
    with pytest.raises(ValueError, match=r"input `q` is int64"):
        kern(**{**ins, "q": ins["q"].astype(np.int64)})
    with pytest.raises(ValueError, match=r"input `q` has 3 axes"):
        kern(**{**ins, "q": ins["q"][0]})
    with pytest.raises(ValueError, match="backend `cuda`: attnc runs `cpu`, `wgsl`, `ptx`"):
        attnc.compile(os.path.join(ROOT, "examples", "alibi.attn"), backend="cuda")
    if attnc.device("ptx") == "cuda:none":
        with pytest.raises(RuntimeError, match="no NVIDIA driver"):
            attnc.compile(os.path.join(ROOT, "examples", "alibi.attn"), backend="ptx")
    with pytest.raises(ValueError, match="`workgroup` is not an option of the cpu backend"):
        attnc.compile(os.path.join(ROOT, "examples", "alibi.attn"), workgroup=64)
    with pytest.raises(ValueError, match="threads"):
        attnc.compile(os.path.join(ROOT, "examples", "alibi.attn"), threads=100000)


def test_a_spec_error_is_a_spec_error_with_its_diagnostic():
    with pytest.raises(attnc.SpecError) as e:
        attnc.compile("attention x { dims B\n input q: f33[B]\n }")
    assert e.value.code == "E0004"
    assert "did you mean `f32`?" in e.value.rendered
    assert e.value.span == (31, 34)


def test_an_index_the_reference_refuses_is_refused():
    src = open(os.path.join(ROOT, "examples", "sdpa.attn")).read().replace("v[b, h, j, e]", "v[b, h, j, e + 1]")
    kern = attnc.compile(src)
    ins = kern.random_inputs(B=1, H=1, N=8, M=8, D=4, Dv=4)
    with pytest.raises(ValueError, match="the reference refuses this index"):
        kern(**ins)


def test_integer_inputs_accept_int64_within_range():
    kern = attnc.compile(os.path.join(ROOT, "examples", "document_mask.attn"))
    dims = {d: v for d, v in {"B": 1, "H": 2, "G": 2, "N": 32, "M": 32, "D": 8, "Dv": 8}.items() if d in kern._k.dims()}
    ins = kern.random_inputs(**dims)
    ints = [n for n, d, _ in kern.inputs if d == "i32"]
    assert ints
    wide = {**ins, **{n: ins[n].astype(np.int64) for n in ints}}
    np.testing.assert_array_equal(kern(**wide), kern(**ins))
    too_big = {**ins, ints[0]: ins[ints[0]].astype(np.int64) + (1 << 40)}
    with pytest.raises(ValueError, match="outside int32"):
        kern(**too_big)


def test_two_threads_run_kernels_at_once_without_the_gil():
    kern = attnc.compile(os.path.join(ROOT, "examples", "alibi.attn"))
    ins = kern.random_inputs(B=1, H=8, G=8, N=1024, M=1024, D=64, Dv=64)
    want = kern(**ins)
    results, ticks = [], [0]
    done = threading.Event()

    def work():
        for _ in range(3):
            results.append(kern(**ins))

    def count():
        while not done.is_set():
            ticks[0] += 1
            time.sleep(0)

    counter = threading.Thread(target=count)
    counter.start()
    workers = [threading.Thread(target=work) for _ in range(2)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    done.set()
    counter.join()
    assert len(results) == 6 and all(np.array_equal(r, want) for r in results)
    # The Python thread kept running while kernels ran: a call holding the GIL would stop it
    # for the whole call, leaving it a tick or two between calls (about a dozen in all), while
    # a released GIL lets it tick throughout (over a thousand times even on a loaded 2-core
    # machine). A count, not a rate: no assumption on the machine's speed.
    elapsed = time.perf_counter() - t0
    assert ticks[0] > 100, f"the counting thread advanced {ticks[0]} times in {elapsed:.3f} s"


def test_compile_is_cached_per_spec_and_options():
    path = os.path.join(ROOT, "examples", "alibi.attn")
    assert attnc.compile(path) is attnc.compile(path)
    assert attnc.compile(path, block_q=32) is not attnc.compile(path)
    kern, ins = alibi_inputs()
    fixed = attnc.compile(path, block_q=32, block_k=32)
    np.testing.assert_allclose(fixed(**ins), kern(**ins), atol=1e-5, rtol=1e-4)
    assert "tiled 32x32" in fixed.last_run()["kernel"]


def test_explain_and_tune(tmp_path, monkeypatch):
    kern, _ = alibi_inputs()
    text = kern.explain(B=1, H=2, G=2, N=128, M=128, D=16, Dv=16)
    assert "algorithm tiled" in text and "workspace" in text
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    table = kern.tune(top_k=2, samples=1, B=1, H=2, G=2, N=64, M=64, D=16, Dv=16)
    assert "cached in" in table and str(tmp_path) in table


@needs_torch
def test_torch_tensors_in_torch_out_without_copies():
    kern, ins = alibi_inputs()
    t = {n: torch.from_numpy(a) for n, a in ins.items()}
    out = kern(**t)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    last = kern.last_run()
    for n, x in t.items():
        assert last["inputs"][n] == x.data_ptr(), f"{n} was copied"
    assert last["output"] == out.data_ptr()
    np.testing.assert_allclose(out.numpy(), kern(**ins), rtol=1e-6, atol=1e-6)
    # bf16 and f16 inputs are converted once.
    half = {**t, "q": t["q"].to(torch.bfloat16)}
    assert kern(**half).shape == out.shape
    # Not a CPU tensor: refused with a message, never copied silently.
    with pytest.raises(ValueError, match="attnc reads inputs from host memory"):
        kern(**{**t, "q": t["q"].to("meta")})


@needs_torch
def test_the_custom_op_runs_eagerly_and_inside_torch_compile():
    import attnc.torch as at

    kern, ins = alibi_inputs()
    op = at.register(kern)
    t = {n: torch.from_numpy(a) for n, a in ins.items()}
    eager = op(**t)
    np.testing.assert_allclose(eager.numpy(), kern(**ins), rtol=1e-6, atol=1e-6)

    def model(q, k, v, slope):
        return op(q=q * 1.0, k=k, v=v, slope=slope) + 1.0

    compiled = torch.compile(model, fullgraph=True)
    got = compiled(t["q"], t["k"], t["v"], t["slope"])
    np.testing.assert_allclose(got.numpy(), eager.numpy() + 1.0, rtol=1e-5, atol=1e-5)



@needs_torch
def test_loss_backward_runs_through_the_custom_op():
    import attnc.torch as at

    kern, ins = alibi_inputs(n=9, h=2)
    op = at.register(kern)
    t = {n: torch.from_numpy(a).requires_grad_(True) for n, a in ins.items()}
    w = torch.randn(op(**t).shape)
    (op(**t) * w).sum().backward()
    # The same loss written in torch and differentiated by torch's autograd (float64).
    q, k, v, slope = (ins[n].astype(np.float64) for n in ("q", "k", "v", "slope"))
    e = {n: torch.from_numpy(a).requires_grad_(True) for n, a in dict(q=q, k=k, v=v, slope=slope).items()}
    n = q.shape[2]
    dist = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).to(torch.float64)
    s = e["q"] @ e["k"].transpose(-1, -2) / np.sqrt(q.shape[-1]) - e["slope"][None, :, None, None] * dist
    s = s.masked_fill(dist < 0, float("-inf"))
    (torch.softmax(s, -1) @ e["v"] * w.double()).sum().backward()
    for name in ("q", "k", "v", "slope"):
        np.testing.assert_allclose(t[name].grad.numpy(), e[name].grad.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
        assert t[name].grad.dtype == torch.float32


def test_dims_with_defaults_may_be_left_out():
    # alibi declares `dims B, H, G = H, N, M = N, D, Dv = D`.
    kern = attnc.compile(os.path.join(ROOT, "examples", "alibi.attn"))
    ins = kern.random_inputs(seed=2, B=1, H=2, N=9, D=4)
    assert ins["k"].shape == (1, 2, 9, 4) and ins["v"].shape == (1, 2, 9, 4)
    np.testing.assert_allclose(kern(**ins), kern.reference(**ins), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="no dim `X`"):
        kern.random_inputs(B=1, H=2, N=9, D=4, X=3)


def test_grad_matches_finite_differences_of_the_reference():
    kern = attnc.compile(os.path.join(ROOT, "examples", "sink_softmax.attn"))
    ins = kern.random_inputs(seed=4, **small_dims(kern))
    # float64 inputs at float32-exact values (the kernel reads them as float32).
    base = {n: a.astype(np.float64) for n, a in ins.items()}
    rng = np.random.default_rng(0)
    dout = rng.standard_normal(kern.reference(**base).shape)
    grads = kern.grad(cotangent=dout, **base)
    assert sorted(grads) == ["k", "q", "sink", "v"]

    def loss(x):
        return float((kern.reference(**x) * dout).sum())

    for name in ("q", "k", "sink"):
        for idx in [tuple(rng.integers(0, d) for d in base[name].shape) for _ in range(4)]:
            h = 1e-3
            up = {**base, name: base[name].copy()}
            up[name][idx] += h
            down = {**base, name: base[name].copy()}
            down[name][idx] -= h
            fd = (loss(up) - loss(down)) / (2 * h)
            assert abs(grads[name][idx] - fd) <= 1e-3 * max(1.0, abs(fd)), (name, idx, grads[name][idx], fd)


def test_grad_defaults_to_ones_and_refuses_a_misshaped_cotangent():
    kern = attnc.compile(os.path.join(ROOT, "examples", "document_mask.attn"))
    ins = kern.random_inputs(seed=1, **{**small_dims(kern), "M": SMALL["N"]})
    grads = kern.grad(**ins)
    ints = {n for n, d, _ in kern.inputs if d == "i32"}
    assert ints and not ints & set(grads), "integer inputs have no gradient"
    ones = np.ones(kern(**ins).shape)
    np.testing.assert_array_equal(kern.grad(cotangent=ones, **ins)["q"], grads["q"])
    with pytest.raises(ValueError, match="the cotangent of `o` has shape"):
        kern.grad(cotangent=np.ones((1, 2, 3)), **ins)


def test_with_stats_returns_each_rows_log_sum_exp():
    kern = attnc.compile(os.path.join(ROOT, "examples", "sdpa_causal.attn"))
    dims = {**small_dims(kern), "M": SMALL["N"]}
    ins = kern.random_inputs(seed=2, **dims)
    out, stats = kern.with_stats(**ins)
    np.testing.assert_array_equal(out, kern(**ins))
    q, k = ins["q"].astype(np.float64), ins["k"].astype(np.float64)
    s = np.einsum("bhid,bhjd->bhij", q, k) / np.sqrt(q.shape[-1])
    n = s.shape[-1]
    s[..., np.triu(np.ones((n, n), bool), 1)] = -np.inf
    mx = s.max(-1, keepdims=True)
    lse = (mx + np.log(np.exp(s - mx).sum(-1, keepdims=True)))
    assert stats.shape == lse.shape and stats.dtype == np.float32
    np.testing.assert_allclose(stats, lse, rtol=1e-5, atol=1e-5)
    sim = attnc.compile(os.path.join(ROOT, "examples", "sdpa_causal.attn"), backend="ptx-sim")
    with pytest.raises(ValueError, match="does not save the forward's statistics yet"):
        sim.with_stats(**ins)


def test_compiled_grad_matches_the_reference_backward():
    kern = attnc.compile(os.path.join(ROOT, "examples", "alibi.attn"))
    ins = kern.random_inputs(seed=3, **small_dims(kern))
    rng = np.random.default_rng(1)
    dout = rng.standard_normal(kern(**ins).shape)
    cpu = kern.grad(cotangent=dout, backend="cpu", **ins)
    ref = kern.grad(cotangent=dout, backend="reference", **ins)
    assert sorted(cpu) == sorted(ref) == ["k", "q", "slope", "v"]
    assert all(g.dtype == np.float32 for g in cpu.values()) and all(g.dtype == np.float64 for g in ref.values())
    # A float32 cotangent, C or Fortran order, gives what a float64 one does (the compiled
    # backward runs in f32).
    for d32 in (dout.astype(np.float32), np.asfortranarray(dout.astype(np.float32))):
        got = kern.grad(cotangent=d32, backend="cpu", **ins)
        for n in cpu:
            np.testing.assert_array_equal(got[n], cpu[n], err_msg=n)
    for n in ref:
        scale = max(1.0, np.abs(ref[n]).max())
        np.testing.assert_allclose(cpu[n], ref[n], rtol=0, atol=1e-4 * scale, err_msg=n)
    gla = attnc.compile(os.path.join(ROOT, "examples", "gla.attn"))
    gins = gla.random_inputs(seed=3, B=1, H=2, N=12, M=12, D=8, Dv=8)  # gla requires N == M
    with pytest.raises(ValueError, match="no compiled backward for this spec yet: the partial for `q` reads the row, the key and the channel"):
        gla.grad(backend="cpu", **gins)
    assert sorted(gla.grad(**gins)) == sorted(n for n, d, _ in gla.inputs if d != "i32"), "auto falls back to the reference"
