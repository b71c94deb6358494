"""The launcher of every generated fused tile backward module.

The text between the ``launcher`` markers is copied verbatim into each module
(:func:`attndsl.codegen.writer.launcher_sources`), after both sections of
codegen/launch_common.py (the kernel cache, the binding of extents and parameters, as the
forward's) and below the kernels and the TENSORS / CAPTURED / CAPTURED_GRADS / PARAMS /
CONSTEXPR_PARAMS / PARAM_DEFAULTS / PARAM_TYPES / ROLES / INDEX_EXTENTS / TENSOR_DIMS / STORES /
SUMS / STABILIZERS / BOUNDS_BLOCK tables it reads; the module needs only torch and triton.
"""

import torch
from attndsl.codegen.launch_common import (
    _bind,
    _by_name,
    _check_lengths,
    _dim_consts,
    _kernel,
    _lengths,
    _offset_flags,
    _strides,
)

# >>> launcher
# The fused backward launcher (copied into each generated module; it reads the tables above).


def tile_backward_config(device_type: str) -> dict:
    """Tile sizes: small tiles (the key kernel holds a K, V, dK and dV tile and several score
    tiles at once); the interpreter runs numpy, where larger tiles mean fewer programs."""
    if device_type == "cpu":
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}


def launch_backward(inputs: dict, params: dict | None, captured: dict | None, grads: dict,
                    need: tuple = (), config: dict | None = None) -> dict:
    """Gradients of the forward's inputs and of the captured tensors named in ``need``.
    ``grads`` maps each output name to its incoming gradient (or None: zero)."""
    captured = dict(captured or {})
    ext, values = _bind(inputs, captured, params)
    first = next(iter(inputs.values()))
    device, dtype = first.device, first.dtype
    n_batch, n_heads, m_len, n_len, e_len, f_len = _lengths(ext)
    d_in = {name: torch.zeros(inputs[name].shape, dtype=torch.float32, device=device)
            for name in TENSORS}  # noqa: F821
    d_cap = {name: torch.zeros(captured[name].shape, dtype=torch.float32, device=device)
             for name in CAPTURED_GRADS}  # noqa: F821

    def result() -> dict:
        out = {name: g.to(inputs[name].dtype) for name, g in d_in.items()}
        out.update({name: d_cap[name].to(captured[name].dtype) for name in need
                    if name in d_cap})
        return out

    if min(m_len, n_len, n_batch * n_heads) == 0:
        return result()
    _check_lengths({"the query length": m_len, "the key length": n_len,
                    "the qk head dim": e_len, "the v head dim": f_len})
    rows = n_batch * n_heads * m_len
    # coefficients of value sums in the inputs' dtype (the 16-bit operand of two dots, as
    # FlashAttention's dO), of row sums in float32
    coef = [torch.zeros(rows * (f_len if tile else 1), device=device,
                        dtype=dtype if tile else torch.float32) for tile in SUMS]  # noqa: F821
    stab = [torch.zeros(rows, dtype=torch.float32, device=device)
            for _ in range(STABILIZERS)]  # noqa: F821
    args: list = []
    for name in TENSORS:  # noqa: F821
        args += _strides(inputs[name])
    for name in CAPTURED:  # noqa: F821
        t = captured[name]
        args += _strides(t.to(torch.int8) if t.dtype == torch.bool else t)
        args += [int(n) for n in t.shape]  # for the wrap of negative subscripts
    args += [values[p] for p in PARAMS if p not in CONSTEXPR_PARAMS]  # noqa: F821
    args += coef + stab
    for name in CAPTURED_GRADS:  # noqa: F821
        args += _strides(d_cap[name])
    args += [n_heads, m_len, n_len, e_len, f_len]
    dy = []
    # element offsets in int32 where they provably fit: the tile dims are those of the rows
    # and head dims, the row buffers are indexed whole
    tile_indices = {ROLES.get(r) for r in ("query", "key", "qk", "v")} - {None}  # noqa: F821
    tile_extents = {INDEX_EXTENTS[i] for i in tile_indices}  # noqa: F821
    tiles = {f"{prefix}{name}": (t, [d for d, x in enumerate(TENSOR_DIMS[name])  # noqa: F821
                                     if x in tile_extents])
             for prefix, ts in (("", inputs), ("d", d_in)) for name, t in ts.items()}
    tiles.update({f"row buffer {i}": (t, (0,)) for i, t in enumerate(coef + stab)})
    for name, (indices, _) in STORES.items():  # noqa: F821
        shape = [ext[i] if ext.get(i) is not None else 1 for i in indices]
        g = grads.get(name)
        g = torch.zeros((1,) * len(shape), device=device) if g is None else g
        g = g.to(device=device, dtype=torch.float32).expand(shape)
        tiles[f"d{name}"] = (g, [d for d, i in enumerate(indices) if i in tile_indices])
        dy += _strides(g)
    offsets = _offset_flags(tiles, (*captured.values(), *d_cap.values()))
    cfg = {**tile_backward_config(device.type), **(config or {})}
    block = BOUNDS_BLOCK  # noqa: F821
    if block is not None and (block % cfg["BLOCK_M"] or block % cfg["BLOCK_N"]):
        raise ValueError(f"tiles ({cfg['BLOCK_M']}, {cfg['BLOCK_N']}) must divide the "
                         f"{block}-key blocks of the mask's closed-form bounds")
    consts = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                  **_dim_consts(device.type, dtype, e_len, f_len),
                  EVEN_M=m_len % cfg["BLOCK_M"] == 0, EVEN_N=n_len % cfg["BLOCK_N"] == 0,
                  **{arg: values[p] for p, arg in CONSTEXPR_PARAMS.items()},  # noqa: F821
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **offsets)
    grid = (-(-m_len // cfg["BLOCK_M"]), n_batch * n_heads)
    _kernel("tile_bwd_rows_kernel", device.type)[grid](
        **_by_name("tile_bwd_rows_kernel", [*args, *dy]), **consts)
    d_args = []
    for name in TENSORS:  # noqa: F821
        d_args += _strides(d_in[name])
    grid = (-(-n_len // cfg["BLOCK_N"]), n_batch * n_heads)
    _kernel("tile_bwd_keys_kernel", device.type)[grid](
        **_by_name("tile_bwd_keys_kernel", [*args, *d_args]), **consts)
    grid = (-(-m_len // cfg["BLOCK_M"]), n_batch * n_heads)
    _kernel("tile_bwd_queries_kernel", device.type)[grid](
        **_by_name("tile_bwd_queries_kernel", [*args, *d_args]), **consts)
    return result()
# <<< launcher
