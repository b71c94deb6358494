"""The public Python API: ``flex_attention`` (drop-in for torch's) and ``compile``.

``flex_attention(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse,
kernel_options, *, mask_mod, return_aux)`` follows the calling convention and semantics of
``torch.nn.attention.flex_attention.flex_attention``::

    def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor
    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor  # bool

    query: (B, Hq, L, E)   key: (B, Hkv, S, E)   value: (B, Hkv, S, Ev)   ->   out: (B, Hq, L, Ev)

The functions are traced once into the Cascade IR (never called per element), compiled into a
fused Triton kernel (cached by content), and run: natively on a GPU, through Triton's
interpreter on a CPU.  The layer below (:mod:`attndsl.runtime.checks`, ``.kernels``,
``.plan``) checks the arguments, caches the compiled kernels and chooses each launch's
key-tile plan; ``AttentionError`` is re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NamedTuple

import torch

from attndsl.eager import bind_extents, run_cascade
from attndsl.frontend.flex import lower_flex
from attndsl.ir.cascade import Cascade
from attndsl.ir.expr import BOOL, FLOAT, INT
from attndsl.passes.linear import LinearOutput
from attndsl.passes.pipeline import Compiled
from attndsl.passes.scans import scan_equations
from attndsl.runtime.checks import AttentionError, check_params, check_scale
from attndsl.runtime.checks import check_qkv as _check_qkv
from attndsl.runtime.checks import kernel_options as _options
from attndsl.runtime.checks import mask_of as _mask_of
from attndsl.runtime.checks import no_work as _no_work
from attndsl.runtime.checks import shapes_only as _shapes_only
from attndsl.runtime.delta import run_delta
from attndsl.runtime.kernels import compiled as _compiled
from attndsl.runtime.kernels import launch_attention
from attndsl.runtime.linear import AUTO, check_chunk, run_linear, scan_inputs
from attndsl.runtime.modules import module_source
from attndsl.runtime.plan import block_mask_plan, check_broadcast, kernel_plan, mask_plan
from attndsl.runtime.user_names import names_captured_tensors

Tensor = torch.Tensor


class AuxRequest(NamedTuple):
    """Which auxiliary outputs to return (as torch's AuxRequest)."""

    lse: bool = False
    max_scores: bool = False


class AuxOutput(NamedTuple):
    lse: Tensor | None = None
    max_scores: Tensor | None = None


class LinearSetup(NamedTuple):
    """The inputs of the linear kernels for one call (:meth:`Kernel.linear_setup`)."""

    outputs: tuple[LinearOutput, ...]
    cascade: Cascade
    tensors: dict[str, Tensor]
    params: dict[str, Any]
    scans: tuple[str, ...]


@names_captured_tensors
def flex_attention(query: Tensor, key: Tensor, value: Tensor,
                   score_mod: Callable | None = None, block_mask: Any = None,
                   scale: float | None = None, enable_gqa: bool = False,
                   return_lse: bool = False, kernel_options: dict | None = None, *,
                   mask_mod: Callable | None = None, return_aux: Any = None) -> Any:
    """Attention with a traced ``score_mod`` and ``mask_mod`` (see the module docstring).

    ``block_mask`` may be torch's ``BlockMask`` or attndsl's: its tables choose the key tiles
    (partial tiles evaluate the mask, full tiles do not) and its ``mask_mod`` is traced.
    ``mask_mod=`` alone needs no block mask.  Returns ``out``, ``(out, lse)`` with
    ``return_lse``, or ``(out, AuxOutput(lse, max_scores))`` with ``return_aux``.  The
    log-sum-exp is in natural log; fully masked rows give 0 and lse = -inf.
    """
    _check_qkv(query, key, value, enable_gqa)
    scale = check_scale("flex_attention", scale)
    if torch.compiler.is_compiling():  # custom ops with fake kernels: no graph breaks
        return _trainable(query, key, value, score_mod, block_mask, scale, enable_gqa,
                          return_lse, kernel_options, mask_mod, return_aux)
    lq, lkv = query.shape[2], key.shape[2]
    plan = block_mask_plan(block_mask, lq, lkv)
    spec = lower_flex(score_mod, _mask_of(block_mask, mask_mod))
    check_broadcast(block_mask, spec.cascade, query.shape[0], query.shape[1])
    if torch.is_grad_enabled() and any(t.requires_grad for t in
                                       (query, key, value, *spec.captured.values())):
        return _trainable(query, key, value, score_mod, block_mask, scale, enable_gqa,
                          return_lse, kernel_options, mask_mod, return_aux)
    _, module = _compiled(spec.cascade)
    if block_mask is None and spec.cascade.mask is not None:
        plan = mask_plan(spec.cascade.mask.expr, spec.captured, query.shape[0],
                         query.shape[1], lq, lkv, query.device)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    out = launch_attention(module, query, key, value, scale,
                           _shapes_only(spec.captured, query.device), plan,
                           _options(kernel_options))
    if return_aux is not None:
        return out["O"], AuxOutput(out["LSE"] if return_aux.lse else None,
                                   out["MAX"] if return_aux.max_scores else None)
    if return_lse:
        return out["O"], out["LSE"]
    return out["O"]


def _trainable(query: Tensor, key: Tensor, value: Tensor, score_mod: Callable | None,
               block_mask: Any, scale: float | None, enable_gqa: bool, return_lse: bool,
               kernel_options: dict | None, mask_mod: Callable | None, return_aux: Any) -> Any:
    """The differentiable path (generated backward kernels, a torch custom op)."""
    from attndsl.autograd import flex_attention_trainable

    options = dict(kernel_options or {})
    deterministic = bool(options.pop("deterministic", False))
    if block_mask is None and mask_mod is not None and not torch.compiler.is_compiling() \
            and not _no_work(query.device, *query.shape[:3], key.shape[2]):
        from attndsl.block_mask import create_block_mask

        block_mask = create_block_mask(mask_mod, query.shape[0], query.shape[1],
                                       query.shape[2], key.shape[2], device=query.device)
    if _options(options):
        raise AttentionError(f"kernel options {sorted(_options(options))} are not supported "
                             f"when gradients are needed")
    out, lse = flex_attention_trainable(query, key, value, score_mod, block_mask, scale,
                                        enable_gqa, True, mask_mod=mask_mod,
                                        deterministic=deterministic)
    if return_aux is not None:
        max_scores = None
        if return_aux.max_scores:  # not differentiable: a forward-only run provides it
            if torch.compiler.is_compiling():
                raise AttentionError("return_aux=AuxRequest(max_scores=True) is not supported "
                                     "inside torch.compile; request lse only")
            with torch.no_grad():
                _, aux = flex_attention(query.detach(), key.detach(), value.detach(), score_mod,
                                        block_mask, scale, enable_gqa, mask_mod=mask_mod,
                                        return_aux=AuxRequest(max_scores=True))
            max_scores = aux.max_scores
        return out, AuxOutput(lse if return_aux.lse else None, max_scores)
    return (out, lse) if return_lse else out


@dataclass
class Kernel:
    """A compiled spec: its IR at every stage, the generated source and the loaded module."""

    compiled: Compiled
    module: ModuleType | None  # None: the cascade has only its chunked linear form
    captured: dict[str, Tensor]

    @property
    def source(self) -> str:
        """The generated module of the quadratic form."""
        self._quadratic()
        return module_source(self.compiled.kernel)

    def _quadratic(self) -> ModuleType:
        if self.module is None:
            raise AttentionError(f"{self.compiled.cascade.name} has no quadratic kernel (it "
                                 f"runs in its chunked linear form, Kernel.linear): "
                                 f"{self.compiled.quadratic_error}")
        return self.module

    def __call__(self, inputs: dict[str, Tensor], params: dict | None = None,
                 captured: dict[str, Tensor] | None = None, block_mask: Any = None,
                 kernel_options: dict | None = None) -> dict[str, Tensor]:
        """Run on named inputs; returns every output of the cascade by name.

        Differentiable: when an input or captured tensor requires grad, the backward runs
        the generated fused backward kernels (:attr:`fused_backward`, derived from the
        streamed schedule by attndsl.passes.tile_grad: every one-pass kernel, softmax or not).
        Where there is none (:attr:`backward_fallback` says why), or an output holding a max
        reduction's value gets a nonzero gradient, it recomputes the cascade with the eager
        executor (float32, chunked over queries) and differentiates that."""
        _check_call(self.compiled.cascade, inputs, params, captured)
        first = next(iter(inputs.values()))
        cap = _shapes_only({**self.captured, **(captured or {})}, first.device)
        if self.compiled.recurrence is not None and block_mask is None:
            return self.linear(inputs, params, cap)[0]
        if self.compiled.linear.form == "chunked" and block_mask is None:
            return self.linear(inputs, params, cap)[0]
        module = self._quadratic()
        scans = {eq.name for eq in scan_equations(self.compiled.cascade)}
        if scans:  # prefix sums (differentiable torch ops): the fused backward's dG flows on
            cap = {**cap, **scan_inputs(self.compiled.cascade, {**inputs, **cap}, params or {})}
        if block_mask is not None:
            c = self.compiled.cascade
            lq, lkv = (_extent(c, inputs, r) for r in ("query", "key"))
            check_broadcast(block_mask, c, *(_extent(c, inputs, r) for r in ("batch", "head")))
            tables = block_mask_plan(block_mask, lq, lkv).launch_tables()
        else:
            tables = self._mask_plan({**inputs, **cap}, params or {}, first.device)
        run = lambda: module.launch(  # noqa: E731
            inputs, params, cap, tables, _options(kernel_options))
        backward = _FusedBackward if self.fused_backward is not None else _EagerBackward
        # the fused backward differentiates the kernel, which reads the prefix sums; the eager
        # one re-runs the original cascade, which computes them from their sources
        tensors = {**inputs, **{k: t for k, t in cap.items()
                                if backward is _FusedBackward or k not in scans}}
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors.values())):
            return run()
        names = list(tensors)
        outs = backward.apply(self, run, names, dict(params or {}), *tensors.values())
        return dict(zip(self.compiled.cascade.outputs, outs))

    @property
    def fused_backward(self) -> ModuleType | None:
        """The generated fused backward module, or None when the kernel has none (then the
        backward recomputes through the eager executor; ``backward_fallback`` says why)."""
        from attndsl.autograd import tile_backward_module

        return tile_backward_module(self.compiled.kernel)[0]

    @property
    def backward_fallback(self) -> str | None:
        """Why this kernel's backward is the eager recomputation (None: it is fused)."""
        from attndsl.autograd import tile_backward_module

        return tile_backward_module(self.compiled.kernel)[1]

    def linear(self, inputs: dict[str, Tensor], params: dict | None = None,
               captured: dict[str, Tensor] | None = None,
               initial_state: dict[str, Tensor] | None = None, chunk: int | str | None = AUTO,
               lengths: Tensor | None = None,
               ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Run the chunked linear form (``attndsl explain`` says whether the cascade has
        one): every output by name and the final state of each ([B, H, E, F], size 1 for
        a batch or head index the cascade lacks; F + 1 columns with a normaliser: z last),
        so that ``initial_state=`` chains segments (prefill, then decode one token at a time
        with ``chunk=None``, the recurrent kernel).  Positions are counted from 0 in each
        segment; decays are relative, so chaining is exact.  Differentiable: the chunked
        Triton backward gives the features' gradients, autograd carries them to the inputs
        and captured gates through the feature evaluation.

        A state recurrence (``recur``, the delta rule) runs its chunked (UT transform) or
        recurrent kernels the same way; its final state is ``{state name: [B, H, E, F]}``,
        ``lengths`` ([B] integers) ends each sequence early (outputs past it are 0, the
        final state is the one at the length), and the backward recomputes the chunked
        form in torch (:mod:`attndsl.runtime.delta`)."""
        if self.compiled.recurrence is not None:
            return self._delta(inputs, params, captured, initial_state, chunk, lengths)
        if lengths is not None:
            raise AttentionError("lengths= is taken by state recurrences (recur) only; a "
                                 "linear cascade runs whole sequences")
        setup = self.linear_setup(inputs, params, captured)
        check_chunk(chunk)
        return run_linear(setup.outputs, setup.cascade, setup.tensors, setup.params,
                          initial_state, chunk, setup.scans)

    def _delta(self, inputs: dict[str, Tensor], params: dict | None,
               captured: dict[str, Tensor] | None, initial_state: dict[str, Tensor] | None,
               chunk: int | str | None, lengths: Tensor | None
               ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The delta rule's kernels on named inputs (prefix sums computed first)."""
        cap = {**self.captured, **(captured or {})}
        tensors = {**inputs, **cap}
        params = _declared_params(self.compiled.cascade, params)
        full = _default_params(self.compiled.cascade, params, tensors)
        tensors.update(scan_inputs(self.compiled.cascade, tensors, full))
        return run_delta(self.compiled.recurrence, self.compiled.stage("materialise-scans"),
                         tensors, full, initial_state, chunk, lengths)

    def linear_setup(self, inputs: dict[str, Tensor], params: dict | None = None,
                     captured: dict[str, Tensor] | None = None) -> LinearSetup:
        """What :meth:`linear` hands the kernels: the chunked form's outputs, the cascade
        they read (prefix sums materialised), the tensors with the prefix sums computed, the
        parameters with defaults, and the names of the prefix sums."""
        decision = self.compiled.linear
        if self.compiled.recurrence is not None:
            raise AttentionError(f"{self.compiled.cascade.name} is a state recurrence "
                                 f"(recur(n), the delta rule) whose state moves by a matrix "
                                 f"per position, not by a decay: Kernel.linear runs it "
                                 f"(initial_state= chains segments), but it has no linear "
                                 f"setup, and so no context-parallel path (ranks' states "
                                 f"combine by decays only)")
        if decision.form != "chunked":
            raise AttentionError(f"{self.compiled.cascade.name} has no linear form: "
                                 f"{'; '.join(decision.reasons)}")
        cap = {**self.captured, **(captured or {})}
        tensors = {**inputs, **cap}
        params = _declared_params(self.compiled.cascade, params)
        full = _default_params(self.compiled.cascade, params, tensors)
        tensors.update(scan_inputs(self.compiled.cascade, tensors, full))
        kernel_cascade = self.compiled.stage("materialise-scans")
        scans = tuple(eq.name for eq in scan_equations(self.compiled.cascade))
        return LinearSetup(decision.outputs, kernel_cascade, tensors, full, scans)

    def _mask_plan(self, tensors: dict[str, Tensor], params: dict,
                   device: torch.device) -> dict | None:
        """The launch tables of a call without a block mask (:func:`kernel_plan`)."""
        return kernel_plan(self.compiled.cascade, self.module, tensors, params,
                           device).launch_tables()


def _extent(c: Cascade, inputs: dict[str, Tensor], role: str) -> int:
    """The length of the index of ``role`` (query, key, batch, head), read off the first
    input that holds it by the cascade's declarations (not by the inputs' order); 1 for a
    role the cascade has no index of."""
    if c.role(role) is None:
        return 1
    extent = c.index(c.role(role)).extent
    for decl in c.tensors:
        if decl.name in inputs and extent in decl.dims:
            return int(inputs[decl.name].shape[decl.dims.index(extent)])
    raise AttentionError(f"cascade {c.name!r}: no input holds the {role} extent {extent}, "
                         f"which a block_mask is built for")


class _KernelFunction(torch.autograd.Function):
    """Forward: the generated kernel on the named tensors (saved for the backward)."""

    @staticmethod
    def forward(ctx: Any, kernel: Kernel, run: Callable, names: list[str], params: dict,
                *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.kernel, ctx.names, ctx.params = kernel, names, params
        ctx.save_for_backward(*tensors)
        out = run()
        return tuple(out[o] for o in kernel.compiled.cascade.outputs)


class _FusedBackward(_KernelFunction):
    """Backward: the generated fused backward kernels (attndsl.passes.tile_grad derives them
    from the kernel's running sums)."""

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple:
        module = ctx.kernel.fused_backward
        outputs = ctx.kernel.compiled.cascade.outputs
        if any(g is not None and bool(g.any()) for o, g in zip(outputs, grads)
               if o in module.MAX_STORES):  # the gradient of a max value: not derived
            return _EagerBackward.backward(ctx, *grads)
        named = dict(zip(ctx.names, ctx.saved_tensors))
        wants = dict(zip(ctx.names, ctx.needs_input_grad[4:]))
        need = tuple(n for n in module.CAPTURED_GRADS if wants.get(n))
        got = module.launch_backward(
            {n: named[n] for n in module.TENSORS}, ctx.params,
            {n: named[n] for n in module.CAPTURED}, dict(zip(ctx.kernel.compiled.cascade.outputs,
                                                             grads)), need)
        out = [None if not wants[n] else got[n] if n in got else torch.zeros_like(t)
               for n, t in named.items()]
        return (None, None, None, None, *out)


class _EagerBackward(_KernelFunction):
    """Backward: autograd through the eager executor."""

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple:
        tensors = ctx.saved_tensors
        leaves = [t.detach().requires_grad_(t.requires_grad and t.is_floating_point())
                  for t in tensors]
        cascade = ctx.kernel.compiled.cascade
        params = dict(ctx.params)
        with torch.enable_grad():
            ref = run_cascade(cascade, dict(zip(ctx.names, leaves)),
                              _default_params(cascade, params, dict(zip(ctx.names, tensors))),
                              dtype=torch.float32)
            pairs = [(ref[o], g) for o, g in zip(cascade.outputs, grads)
                     if g is not None and ref[o].requires_grad]
            wanted = [x for x in leaves if x.requires_grad]
            got = torch.autograd.grad([o for o, _ in pairs], wanted,
                                      [g.to(o.device, o.dtype) for o, g in pairs],
                                      allow_unused=True) if pairs else [None] * len(wanted)
        it = iter(got)
        out = [next(it) if x.requires_grad else None for x in leaves]
        # a tensor no output depends on (e.g. in an empty problem) has a zero gradient
        out = [None if not x.requires_grad else torch.zeros_like(t) if g is None else
               g.to(t.device, t.dtype) for g, x, t in zip(out, leaves, tensors)]
        return (None, None, None, None, *out)


def _check_call(cascade: Cascade, inputs: Any, params: Any, captured: Any) -> None:
    """The arguments of :meth:`Kernel.__call__`: ``inputs`` a non-empty dict of tensors,
    ``captured`` a dict of tensors, ``params`` a dict of numbers naming the cascade's own
    parameters (a misspelt name would leave the parameter at its default, silently)."""
    for what, given in (("inputs", inputs), ("captured", captured or {}),
                        ("params", params or {})):
        if not isinstance(given, dict):
            raise AttentionError(f"{cascade.name}: {what} must be a dict by name, got "
                                 f"{type(given).__name__}")
    if not inputs:
        raise AttentionError(f"{cascade.name}: inputs is empty; expected the input tensors "
                             f"{[t.name for t in cascade.tensors if t.kind == 'input']}")
    for what, given in (("input", inputs), ("captured tensor", captured or {})):
        for name, t in given.items():
            if not isinstance(t, torch.Tensor):
                raise AttentionError(f"{cascade.name}: {what} {name!r} must be a torch.Tensor, "
                                     f"got {type(t).__name__}")
    _check_captured(cascade, captured or {})
    _declared_params(cascade, params)


def _check_captured(cascade: Cascade, captured: dict[str, Tensor]) -> None:
    """Captured tensors name the cascade's own (a misspelt name would leave the traced
    tensor in place, silently) and hold values of the kind it computes with: an integer
    table (indices, ids, windows: integer arithmetic, floor division) integers, a boolean
    one booleans or integers (read as ``!= 0``), a float one no complex values."""
    declared = {t.name: t.dtype for t in cascade.tensors if t.kind != "input"}
    for name, t in captured.items():
        if name not in declared:
            raise AttentionError(f"{cascade.name}: no captured tensor {name!r}; it captures "
                                 f"{sorted(declared) or 'none'}")
        kind = declared[name]
        ok = not t.is_complex() and (
            kind == FLOAT or (not t.is_floating_point() and
                              (kind == BOOL or t.dtype != torch.bool)))
        if not ok:
            raise AttentionError(f"{cascade.name}: captured tensor {name!r} holds {kind} "
                                 f"values (as traced or declared), got {t.dtype}; pass "
                                 f"{'an integer' if kind == INT else 'a ' + kind} tensor")


def _declared_params(cascade: Cascade, params: Any) -> dict:
    """``params`` checked against the cascade's declared parameters (``check_params``)."""
    return check_params(cascade.name, {p.name: p.dtype for p in cascade.params}, params)


def _default_params(cascade: Cascade, params: dict, tensors: dict[str, Tensor]) -> dict:
    """The scalars the kernel's launcher would use: a float scale declared without a default
    = 1/sqrt(qk dim), G from heads."""
    sizes = bind_extents(cascade, tensors)
    out = dict(params)
    qk = next((i.extent for i in cascade.indices if i.role == "qk"), None)
    head = next((i.extent for i in cascade.indices if i.role == "head"), None)
    if any(p.name == "scale" and p.default is None and p.dtype == FLOAT
           for p in cascade.params) and out.get("scale") is None:
        out["scale"] = 1.0 / math.sqrt(sizes.get(qk, 1))
    if any(p.name == "G" for p in cascade.params) and out.get("G") is None and "HKV" in sizes:
        out["G"] = sizes[head] // sizes["HKV"] if sizes["HKV"] else 1  # 0 heads: empty
    return out


def compile(spec: Cascade | None = None, *, score_mod: Callable | None = None,  # noqa: A001
            mask_mod: Callable | None = None) -> Kernel:
    """Compile a cascade, or FlexAttention-style functions, into a reusable kernel."""
    captured: dict[str, Tensor] = {}
    if spec is None:
        flex = lower_flex(score_mod, mask_mod)
        spec, captured = flex.cascade, flex.captured
    elif score_mod is not None or mask_mod is not None:
        raise AttentionError("pass either a cascade or score_mod/mask_mod, not both")
    elif not isinstance(spec, Cascade):
        hint = (" (parse_text/parse_file return {spec name: Cascade}: pass one of its values)"
                if isinstance(spec, dict) else "")
        raise AttentionError(f"compile() takes a Cascade or score_mod=/mask_mod=, got "
                             f"{type(spec).__name__}{hint}")
    comp, module = _compiled(spec)
    return Kernel(comp, module, captured)


__all__ = ["AttentionError", "AuxOutput", "AuxRequest", "Kernel", "compile", "flex_attention"]
