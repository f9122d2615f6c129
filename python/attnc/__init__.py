"""attnc: a compiler for attention kernels.

Write an attention variant as a short declarative ``.attn`` spec, compile it once, and call
it on NumPy arrays or torch CPU tensors::

    import attnc, numpy as np
    kern = attnc.compile("examples/alibi.attn")          # a path or the spec's text
    q = np.random.randn(1, 8, 1024, 64).astype(np.float32)
    k = v = q; slope = np.linspace(0.1, 1.0, 8, dtype=np.float32)
    o = kern(q=q, k=k, v=v, slope=slope)                  # float32, shape (1, 8, 1024, 64)

Inputs are passed by their names in the spec; the dims bind from their shapes (give the
others with ``dims={"W": 7}``). float32 and int32 C-contiguous inputs are read in place, no
copy; float16, bfloat16 and float64 inputs are converted to float32 once, int64 to int32 once
(a value outside int32 is refused), and non-contiguous inputs are copied once. The output
is allocated once and returned in the caller's array type: NumPy in, NumPy out; any torch
tensor in, torch out. ``attnc.compile(spec, backend="wgsl")`` runs on WebGPU (the adapter
wgpu finds: a GPU through Vulkan, Metal or DX12, else lavapipe), with the same inputs and
outputs in host memory; ``backend="ptx"`` on an NVIDIA GPU (the tensor-core kernel for
bf16/f16 specs) and ``backend="ptx-sim"`` in attnc's PTX interpreter (slow: for checking),
inputs and outputs in host memory too. A CUDA tensor is refused (inputs are read from host
memory), never copied silently.

The kernel runs without the GIL, so several Python threads can run kernels at once.
Options are chosen per shape: the winner ``attnc tune`` (or ``kern.tune``) cached for this
machine, else the cost model's choice; ``attnc.compile(spec, block_q=32, block_k=64)`` fixes
them. ``attnc.compile`` caches compiled kernels per (spec, options).

Errors: a spec that does not check raises :class:`SpecError` (``.code``, ``.message``,
``.span``, ``.rendered``: the diagnostic as ``attnc check`` prints it); a missing, misnamed,
mis-shaped or mis-typed input, or an index the reference would refuse, raises
``ValueError`` naming the tensor; too little memory raises ``MemoryError``.
"""

import functools
import os

import numpy as np

from . import _attnc
from ._attnc import SpecError, __version__, device

__all__ = ["compile", "Kernel", "SpecError", "device", "__version__"]

_INT32 = (np.iinfo(np.int32).min, np.iinfo(np.int32).max)


def _is_torch(x):
    return type(x).__module__.startswith("torch") and hasattr(x, "detach") and hasattr(x, "dtype")


def _torch_to_numpy(name, x, want_int):
    """A CPU torch tensor as a NumPy view (float32/int32, C-contiguous) or, where the dtype or
    layout needs it, one converted copy."""
    import torch

    if x.device.type != "cpu":
        raise ValueError(
            f"input `{name}` is on {x.device}: attnc reads inputs from host memory (the GPU backends copy them to the device themselves); "
            f"move it with `.cpu()` (attnc does not copy it silently)"
        )
    x = x.detach()
    if want_int:
        if x.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
            raise ValueError(f"input `{name}` is {x.dtype}; the spec declares an integer tensor (int32 or int64)")
        if x.dtype != torch.int32:
            if x.numel() and (int(x.min()) < _INT32[0] or int(x.max()) > _INT32[1]):
                raise ValueError(f"input `{name}` has values outside int32, the range kernels compute in")
            x = x.to(torch.int32)
    else:
        if not x.is_floating_point():
            raise ValueError(f"input `{name}` is {x.dtype}; the spec declares a float tensor (float32, float16, bfloat16 or float64)")
        if x.dtype != torch.float32:
            x = x.to(torch.float32)
    return x.contiguous().numpy()


def _numpy_input(name, x, want_int):
    a = np.asarray(x)
    if want_int:
        if a.dtype.kind not in "iu":
            raise ValueError(f"input `{name}` is {a.dtype}; the spec declares an integer tensor (int32 or int64)")
        if a.dtype != np.int32:
            if a.size and (a.min() < _INT32[0] or a.max() > _INT32[1]):
                raise ValueError(f"input `{name}` has values outside int32, the range kernels compute in")
            a = a.astype(np.int32)
    else:
        if a.dtype.kind != "f":
            raise ValueError(f"input `{name}` is {a.dtype}; the spec declares a float tensor (float32, float16 or float64)")
        if a.dtype != np.float32:
            a = a.astype(np.float32)
    return np.ascontiguousarray(a)


class Kernel:
    """A compiled spec. Call it with its inputs by name; see the module's documentation."""

    def __init__(self, native, source):
        self._k = native
        self.source = source
        self.name = native.name
        #: ``[(name, dtype, [axes])]`` of the spec's inputs.
        self.inputs = native.inputs()
        self._ints = {n for n, d, _ in self.inputs if d == "i32"}
        self.output_name, self.output_dtype = native.output()

    def __repr__(self):
        ins = ", ".join(f"{n}: {d}[{', '.join(a)}]" for n, d, a in self.inputs)
        return f"<attnc.Kernel {self.name}({ins})>"

    def _arrays(self, arrays):
        torch_in = False
        out = {}
        for name, x in arrays.items():
            if _is_torch(x):
                torch_in = True
                out[name] = _torch_to_numpy(name, x, name in self._ints)
            else:
                out[name] = _numpy_input(name, x, name in self._ints)
        return out, torch_in

    def output_shape(self, dims=None, **shapes):
        """The output's shape for inputs of these shapes (``q=(1, 8, 128, 64), ...``)."""
        return tuple(self._k.output_shape({n: list(s) for n, s in shapes.items()}, dims))

    def __call__(self, dims=None, **arrays):
        a, torch_in = self._arrays(arrays)
        shape = self._k.output_shape({n: list(x.shape) for n, x in a.items()}, dims)
        if torch_in:
            import torch

            # Allocated by NumPy and shared with torch: a torch fill would wake torch's OpenMP
            # threads, which then spin on the cores the kernel is about to use.
            out = np.zeros(shape, np.float32)
            out_t = torch.from_numpy(out)
            self._k.run(a, out, dims)
            if self.output_dtype == "f16":
                return out_t.to(torch.float16)
            if self.output_dtype == "bf16":
                return out_t.to(torch.bfloat16)
            return out_t
        out = np.zeros(shape, np.float32)
        self._k.run(a, out, dims)
        return out.astype(np.float16) if self.output_dtype == "f16" else out

    def with_stats(self, dims=None, **arrays):
        """Runs like a call and also returns what a backward pass needs from this forward:
        ``(output, stats)``, ``stats`` float32 of shape ``[B, H, N, branches]``: each row's
        softmax log-sum-exp (natural log, the sink included; -inf for a row with no live
        key), or its linear denominator (``sum s + eps``; 0 for a row with no live key); 0 for
        other normalizations. CPU backend (other backends raise ``ValueError``)."""
        a, torch_in = self._arrays(arrays)
        shape = self._k.output_shape({n: list(x.shape) for n, x in a.items()}, dims)
        out = np.zeros(shape, np.float32)
        stats = np.zeros(self._k.stats_shape({n: list(x.shape) for n, x in a.items()}, dims), np.float32)
        self._k.run(a, out, dims, stats)
        if self.output_dtype == "f16":
            out = out.astype(np.float16)
        if torch_in:
            import torch

            out_t = torch.from_numpy(out) if self.output_dtype != "bf16" else torch.from_numpy(out).to(torch.bfloat16)
            return out_t, torch.from_numpy(stats)
        return out, stats

    def reference(self, dims=None, **arrays):
        """The f64 reference interpreter (the meaning of the spec; slow, exact), as float64."""
        a, torch_in = self._arrays(arrays)
        shape = self._k.output_shape({n: list(x.shape) for n, x in a.items()}, dims)
        out = np.zeros(shape, np.float64)
        self._k.reference(a, out, dims)
        if torch_in:
            import torch

            return torch.from_numpy(out)
        return out

    def grad(self, cotangent=None, dims=None, backend="auto", **arrays):
        """Gradients of ``sum(cotangent * output)`` with respect to every float input, derived
        from the spec, as ``{name: array}`` (torch in, torch out): float32 from the compiled
        backward (f32 arithmetic, reading the input arrays in place), float64 from the
        reference. ``cotangent`` has
        the output's shape (default: ones, the gradient of the output's sum). Integer inputs
        have no gradient; a row with no live key has gradient zero; NaN propagates.
        ``backend``: ``"cpu"`` runs the compiled backward kernels (f32; every example but
        gla: softmax, sinks, post-maps, sigmoid and other maps, linear normalizations,
        branches, decays, gates, softcap, tables read per pair; raises
        ``ValueError`` naming what it does not cover), ``"reference"`` the f64 reference
        backward (every spec; slow, small shapes), ``"auto"`` (default) the compiled one where
        it applies."""
        a, torch_in = self._arrays(arrays)
        shape = tuple(self._k.output_shape({n: list(x.shape) for n, x in a.items()}, dims))
        if cotangent is None:
            dout = np.ones(shape, np.float32)
        else:
            if _is_torch(cotangent):
                import torch

                c = cotangent.detach().cpu()
                cotangent = (c if c.dtype in (torch.float32, torch.float64) else c.to(torch.float32)).numpy()
            c = np.asarray(cotangent)
            dout = np.ascontiguousarray(c if c.dtype in (np.float32, np.float64) else c.astype(np.float64))
            if dout.shape != shape:
                raise ValueError(f"the cotangent of `{self.output_name}` has shape {dout.shape}; the output has shape {shape}")
        grads = {n: np.frombuffer(b, dtype=d).reshape(s).copy() for n, s, b, d in self._k.grad(a, dout, dims, backend)}
        if torch_in:
            import torch

            return {n: torch.from_numpy(g) for n, g in grads.items()}
        return grads

    def random_inputs(self, seed=0, **dims):
        """Seeded random inputs at these dims (value ranges from the spec's ``in lo..hi``), as
        ``{name: numpy array}``: what ``attnc inputs`` writes."""
        return {n: np.frombuffer(b, dtype=d).reshape(shape).copy() for n, d, shape, b in self._k.random_inputs(dims, seed)}

    def explain(self, **dims):
        """``attnc explain`` at these dims: the rewrites applied and the schedule, as text."""
        return self._k.explain(dims)

    def tune(self, top_k=8, samples=5, seed=0, **dims):
        """``attnc tune`` at these dims (the cache the command line uses); returns the table.
        The next calls at this shape bucket use the winner."""
        return self._k.tune(dims, top_k, samples, seed)

    def last_run(self):
        """Where the last call read its inputs and wrote its output (addresses) and which
        kernel ran: for checking that no input was copied."""
        return self._k.last_run()


@functools.lru_cache(maxsize=256)
def _compile(source, path, options, passes_off, threads, backend, precision="exact"):
    return Kernel(_attnc.compile(source, path, dict(options) if options is not None else None, list(passes_off), threads, backend, precision), source)


def compile(
    spec,
    backend="cpu",
    *,
    threads=0,
    passes_off=(),
    tiled=None,
    microkernel=None,
    block_q=None,
    block_k=None,
    chunk=None,
    workgroup=None,
    channels=None,
    precision="exact",
):
    """Checks and optimizes a spec: ``spec`` is a path to a ``.attn`` file or its text.

    ``backend`` is ``"cpu"``, ``"wgsl"`` (WebGPU; ``RuntimeError`` naming what to install
    when wgpu finds no adapter), ``"ptx"`` (an NVIDIA GPU; ``RuntimeError`` without a driver)
    or ``"ptx-sim"`` (the PTX in attnc's interpreter, slow). ``threads`` is the CPU's
    worker count (0: every core). ``passes_off`` switches passes off (``("lowrank",)``).
    Options fix the schedule; without them it is chosen per shape (the tuned winner for
    this machine, else the cost model's choice). CPU: ``tiled``, ``microkernel``,
    ``block_q``, ``block_k``, ``chunk``. WGSL: ``tiled`` (off: the row kernel), ``block_q``
    and ``block_k`` (the tile; the row kernel's rows per row of tile classes), ``chunk``
    (keys per chunk of the linear family's chunked kernel, at most 64; 0: quadratic),
    ``workgroup`` (invocations, a power of two from 8 to 256; the tiled kernel runs
    ``workgroup / block_q`` per query row) and ``channels`` (output channels per
    invocation). PTX: ``tiled`` (off: the row kernel even for bf16 specs), ``channels``
    (the row kernel's output channels per thread), ``chunk`` (the linear family's chunked
    kernel, at most 64 keys, the default; 0: quadratic) and ``precision``: ``"exact"``
    (the spec's types: an f32 spec runs exact f32 kernels), ``"bf16"`` or ``"f16"`` (an f32
    spec's queries, keys and values rounded on the device so the tensor cores take it,
    within the ``tolerance`` that ``last_run()`` reports). Compiled kernels are cached per (spec,
    backend, options)."""
    if backend not in ("cpu", "wgsl", "ptx", "ptx-sim"):
        raise ValueError(f"backend `{backend}`: attnc runs `cpu`, `wgsl`, `ptx` (an NVIDIA GPU) and `ptx-sim` (the PTX interpreter)")
    path = "<string>"
    text = spec
    if "{" not in spec and os.path.exists(spec):
        path = spec
        with open(spec, encoding="utf-8") as f:
            text = f.read()
    named = dict(tiled=tiled, microkernel=microkernel, block_q=block_q, block_k=block_k, chunk=chunk, workgroup=workgroup, channels=channels)
    given = {k: v for k, v in named.items() if v is not None}
    options = tuple(sorted((k, int(v)) for k, v in given.items())) if given else None
    return _compile(text, path, options, tuple(passes_off), int(threads), backend, precision)
