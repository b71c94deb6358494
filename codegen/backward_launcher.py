"""The launcher of every generated backward module.

The text between the ``launcher`` markers is copied verbatim into each module
(:func:`attndsl.codegen.writer.launcher_sources`), after the common and block-table sections of
codegen/launch_common.py and below the kernels and the CAPTURED / GRADS / HAS_MASK tables it
reads; the module needs only torch and triton.  The imports above the marker stand for what
the module has there (its prologue imports math and torch).
"""

import math

import torch
from attndsl.codegen.launch_common import (
    AttentionInputError,
    _block,
    _block_sizes,
    _by_name,
    _cdiv,
    _check_disjoint,
    _check_lengths,
    _check_spans,
    _checked_pair,
    _dim_consts,
    _kernel,
    _offset_flags,
    _strides,
    _table_tiles,
)

# >>> launcher
# The backward launcher (copied into each generated backward module after launch_common.py's
# common section; the module defines the kernels and the CAPTURED / GRADS / HAS_MASK tables it
# reads; it needs only torch and triton).


def backward_config(device_type: str, head_dim: int, v_dim: int,
                    capability: tuple[int, int] | None = None) -> dict:
    """Launch settings per kernel: ``dkdv`` (BLOCK_M queries x BLOCK_N keys per step, one
    program per key tile) and ``dq`` (one program per query tile).  GPU values: no register
    spills for sm90 fp16 (ahead-of-time reports of a plain and of a softcap + ALiBi + relative
    bias + causal spec; the dK/dV kernel holds dK, dV, K, V and four score tiles at once).

    ``DP_FIRST`` (dQ): issue dP = dO V^T ahead of the scores.  On the 32 x 32 tiles of head
    dims past 64 the exponentials of P then fill the latency of dP's dependent MMAs (static
    SASS, triton 3.6 / 3.8 / 3.9, sm90 and sm80: the dense, causal and ALiBi dQ loops 3 to 11
    instructions lighter, 5 NOPs gone at 3.6 sm90 dense; softcap's 1 to 5 heavier, still 0.89
    of a hand-written kernel's); on 64 x 64 tiles dP held across P costs registers (3.6 sm90
    causal D 64: 122 -> 131), so those keep it after P.

    ``capability`` (a CUDA device's compute capability; None = sm90's choice): below sm90
    (mma.sync, no wgmma) the D <= 64 dQ kernel takes 32 x 64 tiles on 4 warps; 64 x 64 on 8
    warps ran out of registers there (255 and spills, ours and a hand-written one alike)."""
    if device_type == "cpu":  # the interpreter runs numpy: large tiles, few programs
        one = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
        return {"dkdv": one, "dq": dict(one, DP_FIRST=False)}
    if max(head_dim, v_dim) <= 64:
        dq = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2, "DP_FIRST": False}
        if capability is not None and capability[0] < 9:
            dq.update(BLOCK_M=32, num_warps=4)
        return {"dkdv": {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 8, "num_stages": 1},
                "dq": dq}
    return {"dkdv": {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
            "dq": {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 8, "num_stages": 1,
                   "DP_FIRST": True}}


def transpose_block_tables(num: torch.Tensor, idx: torch.Tensor, n_cols: int):
    """kv-major (num, idx) -> q-major (num, idx): the same block set, listed by column."""
    rows = idx.shape[-2]
    listed = torch.arange(idx.shape[-1], device=idx.device) < num[..., None].long()
    col = torch.where(listed & (idx.long() < n_cols), idx.long(), n_cols)
    dense = torch.zeros(tuple(idx.shape[:-1]) + (n_cols + 1,), dtype=torch.bool,
                        device=idx.device)
    dense.scatter_(-1, col, True)
    dense_t = dense[..., :n_cols].transpose(-1, -2)  # [.., cols, rows]
    order = torch.argsort((~dense_t).to(torch.int8), dim=-1, stable=True)
    return dense_t.sum(-1).to(torch.int32), order[..., :rows].to(torch.int32)


def _checked_block_tables(block_tables: dict, device: torch.device, heads: tuple[int, int],
                          n_q_blocks: int, n_kv_blocks: int) -> dict:
    """``block_tables`` with every table as contiguous-strided int32 on ``device``, refused
    unless the kernels' reads stay inside them and the kv-major tables (the forward's, read
    by the dQ kernel) and the q-major ones (read by the dK/dV kernel) list the same partial
    and the same full blocks, each block at most once: a mismatch would give the gradient of
    another mask, silently."""
    if block_tables.get("closed_form") or block_tables.get("kv_ranges") is not None:
        raise AttentionInputError(
            "launch_backward reads block tables (kv_num_blocks, kv_indices, full_kv_*, and "
            "optionally the q_* transposes); a closed-form or range-table plan must be passed "
            "as its tables (KeyTilePlan.block_tables())")
    out = dict(block_tables)
    seen: dict = {}
    for major, rows, cols in (("kv_", n_q_blocks, n_kv_blocks), ("q_", n_kv_blocks, n_q_blocks)):
        for part in ("", "full_"):
            name = f"{part}{major}num_blocks"
            num, idx = block_tables.get(name), block_tables.get(f"{part}{major}indices")
            if (num is None) != (idx is None):
                raise AttentionInputError(f"block tables {name} and {part}{major}indices "
                                          f"must be given together (or neither)")
            if num is None and not part and major == "kv_":
                raise AttentionInputError("block_tables has no kv_num_blocks")
            if num is None:
                continue
            dense = _checked_pair(name, num, idx, device, heads, rows, cols, major == "kv_")
            seen[major, part] = dense if major == "kv_" else dense.transpose(-1, -2)
            out[name] = num.to(torch.int32)
            out[f"{part}{major}indices"] = idx.to(torch.int32)
    for major in ("kv_", "q_"):
        part, full = seen.get((major, "")), seen.get((major, "full_"))
        if part is not None and full is not None:
            _check_disjoint(part, full, major)
    if ("q_", "") in seen:
        for part in ("", "full_"):
            kv, q = seen.get(("kv_", part)), seen.get(("q_", part))
            if kv is None or q is None:  # a missing table lists no block
                same = not bool((q if kv is None else kv).any()) if kv is not q else True
            else:
                shape = torch.broadcast_shapes(kv.shape, q.shape)
                same = torch.equal(kv.expand(shape), q.expand(shape))
            if not same:
                raise AttentionInputError(
                    f"block tables {part}q_num_blocks/{part}q_indices list other blocks than "
                    f"the transpose of {part}kv_num_blocks/{part}kv_indices; the backward "
                    f"must read the forward's block set (omit the q_* tables to derive them)")
    return out


def _tables(block_tables, device, prefix: str, n_kv_blocks: int) -> list:
    """Kernel arguments of one kind of table (``kv_`` or ``q_``), or dummies; q-major tables
    missing from ``block_tables`` (already checked) are derived from the kv-major ones."""
    if block_tables is None:
        dummy = torch.zeros(4, dtype=torch.int32, device=device)
        return [dummy, 0, 0, 0, dummy, 0, 0, 0, 0] * 2
    if prefix == "q_" and block_tables.get("q_num_blocks") is None:
        for part in ("", "full_"):
            num = block_tables.get(f"{part}kv_num_blocks")
            if num is not None:
                qn, qi = transpose_block_tables(num, block_tables[f"{part}kv_indices"],
                                                n_kv_blocks)
                block_tables = dict(block_tables, **{f"{part}q_num_blocks": qn,
                                                     f"{part}q_indices": qi})
    args = []
    for key in ("num_blocks", "indices", "full_num_blocks", "full_indices"):
        full = key.startswith("full_")
        name = ("full_" if full else "") + prefix + key.removeprefix("full_")
        t = block_tables.get(name)
        if t is None:  # no full blocks: every listed block is partial
            t = torch.zeros([1, 1, 1] + ([1] if "indices" in key else []), dtype=torch.int32,
                            device=device)
        _check_spans({f"block table {name}": t}, "the kernels index block tables in 32 bits")
        args += _strides(t)
    return args


def _backward_scale(params: dict | None, group: int) -> float | None:
    """The scale in ``params`` (None: the default 1/sqrt(E)), refused unless ``params`` names
    only the forward's parameters, ``scale`` (a real number) and ``G`` (read off the head
    counts here; given, it must be that group): a misspelt name would run the default."""
    import numbers

    if params is None:
        return None
    if not isinstance(params, dict):
        raise AttentionInputError(f"params must be a dict of parameter values by name, got "
                                  f"{type(params).__name__}")
    for name, value in params.items():
        if name not in ("scale", "G"):
            raise AttentionInputError(f"params names {name!r}, which is not a parameter of "
                                      f"this kernel; its parameters are ['G', 'scale']")
        if name == "G" and value is not None and value != group:
            raise AttentionInputError(f"params gives G = {value!r}, but the head counts make "
                                      f"{group} query heads per key/value head")
    scale = params.get("scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise AttentionInputError(f"parameter 'scale' is {scale!r} ({type(scale).__name__}); "
                                  f"expected a real number")
    return None if scale is None else float(scale)


def launch_backward(inputs: dict, outputs: dict, grads: dict, params: dict,
                    captured: dict | None = None, need: tuple = (),
                    block_tables: dict | None = None, config: dict | None = None,
                    deterministic: bool = False) -> dict:
    """Gradients of the forward's inputs.  ``inputs``: Q, K, V; ``outputs``: O and LSE of the
    forward; ``grads``: dO under "O" and dLSE (or None) under "LSE"; ``params``: scale (G is
    read off the head counts); ``need``: names of captured tensors to differentiate.
    ``block_tables``: the forward's kv-major tables plus, optionally, the q-major
    q_num_blocks/q_indices/full_q_num_blocks/full_q_indices (derived when absent).
    Returns dQ, dK, dV under "Q", "K", "V" and each needed captured gradient by name."""
    captured = dict(captured or {})
    q, k, v = inputs["Q"], inputs["K"], inputs["V"]
    o, lse, do = outputs["O"], outputs["LSE"], grads["O"]
    n_batch, n_heads, m_len, e_len = q.shape
    n_kv_heads, n_len, f_len = k.shape[1], k.shape[2], v.shape[3]
    device, dtype = q.device, q.dtype
    group = n_heads // max(1, n_kv_heads)  # no heads at all: an empty problem
    scale = _backward_scale(params, group)
    scale = 1.0 / math.sqrt(e_len) if scale is None else scale
    dlse = grads.get("LSE")
    if dlse is None:
        dlse = torch.zeros((1, 1, 1), dtype=torch.float32, device=device).expand(lse.shape)
    cap_grads = {name: torch.zeros(captured[name].shape, dtype=torch.float32, device=device)
                 for name in GRADS if name in need}  # noqa: F821
    dq32 = torch.zeros(q.shape, dtype=torch.float32, device=device)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    if min(n_batch, n_heads, m_len, n_len) == 0:
        return {"Q": dq32.to(dtype), "K": dk, "V": dv, **cap_grads}
    _check_lengths({"the query length": m_len, "the key length": n_len,
                    "the qk head dim": e_len, "the v head dim": f_len})
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    cfg = backward_config(device.type, e_len, f_len, capability)
    for part, over in (config or {}).items():
        cfg[part] = {**cfg[part], **over}
    sparsity, sparse_q, sparse_kv = (1 if HAS_MASK else 0), 1, 1  # noqa: F821
    if block_tables is not None:
        sparsity = 2
        sparse_q, sparse_kv = _block_sizes(block_tables)
    consts = {}
    for part, c in cfg.items():
        bm, bn = c["BLOCK_M"], c["BLOCK_N"]
        if sparsity == 2:
            bm, bn = _table_tiles(bm, bn, sparse_q, sparse_kv)
        consts[part] = dict(BLOCK_M=bm, BLOCK_N=bn, SPARSITY=sparsity, SPARSE_Q=sparse_q,
                            SPARSE_KV=sparse_kv, **_dim_consts(device.type, dtype, e_len, f_len),
                            # tables list whole blocks: even means a multiple of them
                            EVEN_M=m_len % (sparse_q if sparsity == 2 else bm) == 0,
                            EVEN_N=n_len % (sparse_kv if sparsity == 2 else bn) == 0,
                            num_warps=c["num_warps"], num_stages=c["num_stages"])
    consts["dq"]["DP_FIRST"] = bool(cfg["dq"].get("DP_FIRST", False))
    if block_tables is not None:
        block_tables = _checked_block_tables(block_tables, device, (n_batch, n_heads),
                                             _cdiv(m_len, sparse_q), _cdiv(n_len, sparse_kv))
    # delta = rowsum(dO * O) - dLSE
    delta = torch.empty(lse.shape, dtype=torch.float32, device=device)
    neg_lse2 = torch.empty(lse.shape, dtype=torch.float32, device=device)  # -LSE log2e
    # element offsets in int32 where they provably fit (rows and head dims are the tiles)
    tiled = dict(Q=q, K=k, V=v, O=o, LSE=lse, dO=do, dLSE=dlse, dQ=dq32, dK=dk, dV=dv,
                 delta=delta, neg_lse2=neg_lse2)
    offsets = _offset_flags({name: (t, range(2, t.dim())) for name, t in tiled.items()},
                            (*captured.values(), *cap_grads.values()))
    cap_args = []
    for name in CAPTURED:  # noqa: F821
        t = captured[name]
        cap_args += _strides(t.to(torch.int8) if t.dtype == torch.bool else t) + \
            [int(size) for size in t.shape]  # for the wrap of negative subscripts
    # the anchor of the split of T log2e: one per query tile of either kernel (powers of two)
    anchor = max(consts["dkdv"]["BLOCK_M"], consts["dq"]["BLOCK_M"])
    pre = cfg["dq"]
    _kernel("attention_bwd_preprocess", device.type)[
        (_cdiv(m_len, pre["BLOCK_M"]), n_batch * n_heads)](
        **_by_name("attention_bwd_preprocess", [
            *_strides(o), *_strides(do), *_strides(dlse), *_strides(delta), *_strides(lse),
            *_strides(neg_lse2), *cap_args, scale, n_heads, m_len, f_len]),
        BLOCK_M=pre["BLOCK_M"], BLOCK_F=_block(f_len), ANCHOR_M=anchor,
        num_warps=pre["num_warps"], **offsets)
    grad_args = []
    for name in GRADS:  # noqa: F821
        t = cap_grads.get(name, torch.zeros((1,) * captured[name].dim(), device=device))
        grad_args += _strides(t)
    common = [*_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(neg_lse2),
              *_strides(delta)]
    dq = torch.empty_like(q) if deterministic else dq32
    n_kv_blocks = _cdiv(n_len, sparse_kv)
    need_flags = {f"NEED_{ptr}": name in cap_grads for name, ptr in GRADS.items()}  # noqa: F821
    # dK, dV (and, unless deterministic, dQ by atomics): a program per key tile
    dkdv_grid = (_cdiv(n_len, consts["dkdv"]["BLOCK_N"]), n_batch * n_kv_heads)
    _kernel("attention_bwd_dkdv_kernel", device.type)[dkdv_grid](
        **_by_name("attention_bwd_dkdv_kernel", [
            *common, *_strides(dq), *_strides(dk), *_strides(dv), *cap_args, *grad_args, scale,
            n_heads, n_kv_heads, m_len, n_len, e_len, f_len,
            *_tables(block_tables, device, "q_", n_kv_blocks)]),
        ANCHOR_M=anchor, ATOMIC_DQ=not deterministic, G=group, **need_flags, **consts["dkdv"],
        **offsets)
    if deterministic:  # dQ: a program per query tile
        dq_grid = (_cdiv(m_len, consts["dq"]["BLOCK_M"]), n_batch * n_heads)
        _kernel("attention_bwd_dq_kernel", device.type)[dq_grid](
            **_by_name("attention_bwd_dq_kernel", [
                *common, *_strides(dq), *cap_args, scale, n_heads, m_len, n_len, e_len, f_len,
                *_tables(block_tables, device, "kv_", n_kv_blocks)]),
            ANCHOR_M=anchor, G=group, **consts["dq"], **offsets)
    else:
        dq = dq.to(dtype)
    out = {"Q": dq, "K": dk, "V": dv}
    out.update({name: g.to(captured[name].dtype) for name, g in cap_grads.items()})
    return out
# <<< launcher
