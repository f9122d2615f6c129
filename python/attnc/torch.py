"""attnc as a torch operator: ``attnc.torch.register(kern)`` makes a compiled spec a
``torch.library.custom_op`` with a fake (meta) implementation, so it sits inside a
``torch.compile``d model as one opaque op::

    import attnc, attnc.torch
    alibi = attnc.torch.register(attnc.compile("examples/alibi.attn"))
    o = alibi(q=q, k=k, v=v, slope=slope)               # eager
    o = torch.compile(lambda q, k, v, s: alibi(q=q, k=k, v=v, slope=s))(q, k, v, s)

``loss.backward()`` works through the op: the backward is derived from the spec
(:meth:`attnc.Kernel.grad`: the compiled backward kernels where they cover the spec and the
kernel runs on the CPU, else the reference backward in f64, exact and slow). Integer inputs
get no gradient.
"""

import torch

_registered = {}


def register(kernel, name=None):
    """Registers ``kernel`` (an :class:`attnc.Kernel`) as the custom op ``name`` (default
    ``attnc::<spec name>``) and returns a function taking the spec's inputs by name. The op
    takes them positionally, in the spec's order: ``torch.ops.attnc.<name>(q, k, v, ...)``."""
    name = name or f"attnc::{kernel.name}"
    if name in _registered:
        return _registered[name]
    names = [n for n, _, _ in kernel.inputs]
    schema = "(" + ", ".join(f"Tensor {n}" for n in names) + ") -> Tensor"

    def impl(*tensors):
        return kernel(**dict(zip(names, tensors)))

    op = torch.library.custom_op(name, impl, mutates_args=(), schema=schema)

    @op.register_fake
    def _(*tensors):
        shape = kernel.output_shape(**{n: tuple(int(s) for s in t.shape) for n, t in zip(names, tensors)})
        dtype = {"f16": torch.float16, "bf16": torch.bfloat16}.get(kernel.output_dtype, torch.float32)
        return tensors[0].new_empty(shape, dtype=dtype)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad):
        tensors = ctx.saved_tensors
        grads = kernel.grad(cotangent=grad, **dict(zip(names, tensors)))
        return tuple(grads[n].to(device=t.device, dtype=t.dtype) if n in grads else None for n, t in zip(names, tensors))

    op.register_autograd(backward, setup_context=setup_context)

    def call(**tensors):
        missing = [n for n in names if n not in tensors]
        extra = [n for n in tensors if n not in names]
        if missing or extra:
            raise ValueError(f"{kernel.name} takes {', '.join(names)} (missing: {', '.join(missing) or 'none'}; unknown: {', '.join(extra) or 'none'})")
        return op(*[tensors[n] for n in names])

    call.op = op
    _registered[name] = call
    return call
