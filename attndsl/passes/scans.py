"""``materialise-scans``: per-position prefix sums become derived per-position tensors.

A scan equation ``G[b,h,n] = cumsum(n) body`` (the language's prefix sum over the key index)
has a body that depends only on per-position values (the frontends and
:func:`attndsl.ir.cascade.verify` check that: no query index, no reductions, only declared
tensors).  Its value is O(L) work, so the kernels do not compute it: this pass declares ``G``
as a captured tensor of the cascade the kernels see (dimensions: the extents of G's indices)
and drops the equation, and the runtime computes ``G`` before the launch
(:func:`attndsl.runtime.linear.scan_inputs`: the body element-wise, then ``torch.cumsum`` in
float32, or float64 for float64 inputs).  Reads such as ``exp(G[b,h,m] - G[b,h,n])`` are then
ordinary gathers of a captured tensor, so the quadratic printer needs no new operation, and
the linear pass sees the decay as ``exp(g(m) - g(n))`` with ``g = G``.

The float64 oracle evaluates the scan itself, from the original cascade
(:func:`attndsl.eager.run_cascade`), so kernel and oracle share only the IR.
"""

from __future__ import annotations

from attndsl.ir.cascade import Cascade, Equation, TensorDecl, is_scan


def scan_equations(c: Cascade) -> tuple[Equation, ...]:
    """The per-position prefix sums of ``c``, in cascade order."""
    return tuple(eq for eq in c.equations if is_scan(eq))


def scan_decl(c: Cascade, eq: Equation) -> TensorDecl:
    """The captured tensor a scan equation becomes: dimensions are its indices' extents."""
    return TensorDecl(eq.name, tuple(c.index(i).extent for i in eq.indices), eq.expr.dtype,
                      "captured")


def materialise_scans(c: Cascade) -> Cascade:
    """Each scan equation -> a captured tensor of the same name, computed by the runtime."""
    scans = scan_equations(c)
    if not scans:
        return c
    rest = tuple(eq for eq in c.equations if not is_scan(eq))
    tensors = c.tensors + tuple(scan_decl(c, eq) for eq in scans)
    return Cascade(c.name, c.indices, tensors, c.params, rest, c.outputs, c.mask)
