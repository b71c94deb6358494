"""Launch code shared by every generated module (forward, FlexAttention backward, fused tile
backward).

The text of each section is copied verbatim into the modules
(:func:`attndsl.codegen.writer.launcher_sources`), above the direction's own launcher:
``common`` into every module, ``block-tables`` into the modules that read torch-layout block
tables (the forward and the FlexAttention backward), ``tile-kernel`` into the modules of a Tile
IR kernel (the forward and its fused backward), which define the TENSOR_DIMS, INDEX_EXTENTS,
ROLES, PARAMS, PARAM_DEFAULTS and PARAM_TYPES tables it reads; ``by-name`` into the backward
modules, whose KERNEL_ARGS table lists each kernel's runtime arguments.  The modules need only
torch and triton; the imports above the first marker are the modules' own (their prologue
imports math and torch).
"""

import math

import torch

# >>> common
# Launch code shared by every generated module (codegen/launch_common.py).

_KERNELS: dict = {}


class AttentionInputError(ValueError):
    """Inputs that do not fit the kernels: the message says what was expected."""


def _kernel(name: str, device_type: str):
    """The kernel ``name`` of this module, compiled for GPUs, or run by Triton's interpreter
    for CPU tensors; one cache per module, keyed by (kernel, device type)."""
    if (name, device_type) not in _KERNELS:
        fn = globals()[name]
        if device_type == "cpu":
            from triton.runtime.interpreter import InterpretedFunction

            if not isinstance(tl.zeros, InterpretedFunction):  # noqa: F821
                raise AttentionInputError(
                    "CPU tensors run in Triton's interpreter, which needs TRITON_INTERPRET=1 "
                    "in the environment before triton is first imported")

            _KERNELS[name, device_type] = InterpretedFunction(fn)
        else:
            from triton.runtime.jit import JITFunction

            _KERNELS[name, device_type] = JITFunction(fn)
    return _KERNELS[name, device_type]


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _block(length: int) -> int:
    """The constexpr block of a head dim: the next power of two, at least 16 (tl.dot's K)."""
    return max(16, _next_pow2(length))


def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


_I32_LIMIT = 2**31  # element offsets computed in int32 must stay below this
_LANES = 256  # tile lanes a load may run past a tensor's end (masked): no tile dim is longer


def _check_spans(tensors: dict, why: str) -> None:
    """Refuse a tensor the kernels index whole in 32 bits (``why`` says which and why): every
    element offset ``sum_d index_d * stride_d`` must stay below 2**31.  The largest is
    ``sum_d (size_d - 1) * |stride_d|`` (0 along broadcast and empty dims)."""
    for name, t in tensors.items():
        span = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())
                   if size > 1)
        if t.numel() and span >= _I32_LIMIT:
            raise AttentionInputError(
                f"{name} of shape {tuple(t.shape)} and strides {tuple(t.stride())} reaches "
                f"element offset {span}; {why}, so it must span fewer than 2**31 elements")


def _tile_span(t: torch.Tensor, dims) -> int:
    """The largest element offset a tile of ``t`` computes from its (batch, head) base along
    ``dims`` (its row and column dims), the masked lanes past the end included: per dim
    ``(extent - 1) * |stride|`` with the extent padded by a tile's overhang (``_LANES`` rows,
    a head dim to its power-of-two block)."""
    return sum((max(t.shape[d] + _LANES, _block(t.shape[d])) - 1) * abs(t.stride(d))
               for d in dims)


def _offset_flags(tiles: dict, whole: tuple = ()) -> dict:
    """The constexprs I32_BASES and I32_TILES of a launch over ``tiles`` (name -> (tensor, its
    tile dims)) and ``whole`` (tensors read at any subscript: captured tensors and their
    gradients): whether every tensor spans fewer than 2**31 elements (int32 base offsets and
    captured-tensor offsets), and whether every tile offset from a (batch, head) base does
    (int32 in-tile offsets).  Each is False when it may not hold: the kernel then computes
    those offsets in int64."""
    live = [(t, dims) for t, dims in tiles.values() if t.numel()]
    i32_tiles = all(_tile_span(t, dims) < _I32_LIMIT for t, dims in live)
    i32_bases = i32_tiles and all(
        sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()) if size > 1)
        < _I32_LIMIT for t in [t for t, _ in live] + [t for t in whole if t.numel()])
    return {"I32_BASES": i32_bases, "I32_TILES": i32_tiles}


def _check_lengths(lengths: dict) -> None:
    """Refuse a sequence or head dim the kernels cannot count: tile indices (``start_n +
    arange(BLOCK_N)``, loop counters, descriptor shapes) are int32, so a length plus a tile
    must stay below 2**31 (a tensor that long is at least 2**31 rows)."""
    for name, n in lengths.items():
        if n + _LANES >= _I32_LIMIT:
            raise AttentionInputError(
                f"{name} is {n}; the kernels count positions in 32 bits, so it must be below "
                f"2**31 - {_LANES} (split the sequence into calls)")


def _strides(t: torch.Tensor) -> list:
    """A tensor and its strides, as kernel arguments (stride 0 along broadcast dims)."""
    return [t] + [0 if t.shape[d] == 1 else t.stride(d) for d in range(t.dim())]


def _dim_consts(device_type: str, dtype: torch.dtype, e_len: int, f_len: int) -> dict:
    """The constexprs every kernel takes from the head dims and the dtype: BLOCK_E / BLOCK_F,
    EVEN_E / EVEN_F (the block is the dim: no head-dim masks), DOT_PRECISION (IEEE for fp32
    inputs) and UPCAST (the interpreter has no bf16 arithmetic)."""
    block_e, block_f = _block(e_len), _block(f_len)
    return dict(BLOCK_E=block_e, BLOCK_F=block_f, EVEN_E=block_e == e_len,
                EVEN_F=block_f == f_len,
                DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
                UPCAST=device_type == "cpu" and dtype == torch.bfloat16)
# <<< common


# >>> block-tables
# Checks of torch-layout block tables (codegen/launch_common.py): the forward's kv-major
# tables, and the backward's kv-major and q-major ones.

def _block_matrix(num: torch.Tensor, idx: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Which (row, column) blocks the first ``num`` entries of the first ``rows`` rows list:
    bool [.., rows, cols] (the indices already checked to lie in [0, cols))."""
    num, idx = num[..., :rows].long(), idx[..., :rows, :].long()
    listed = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
    dense = torch.zeros(tuple(idx.shape[:-1]) + (cols + 1,), dtype=torch.bool,
                        device=idx.device)
    dense.scatter_(-1, torch.where(listed, idx, cols), True)
    return dense[..., :cols]


def _lists_a_block_twice(num: torch.Tensor, idx: torch.Tensor, rows: int, cols: int) -> bool:
    """Whether some row's first ``num`` entries name one block twice (sorted, the listed
    entries come first and a repeat sits next to itself)."""
    idx = idx[..., :rows, :].long()
    listed = torch.arange(idx.shape[-1], device=idx.device) < num[..., :rows, None].long()
    ordered = torch.where(listed, idx, cols).sort(dim=-1).values
    return bool(((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] < cols)).any())


def _checked_pair(name: str, num, idx, device: torch.device, heads: tuple[int, int],
                  rows: int, cols: int, kv_major: bool) -> torch.Tensor:
    """The block matrix of one (``name`` counts, indices) table pair as the kernels read it,
    refused unless every read stays inside the tables and names an existing block: integer
    tensors on the inputs' device, counts [B or 1, H or 1, >= rows] in [0, the indices'
    columns], indices [B or 1, H or 1, rows, columns] naming, among the first count entries
    of each of the first ``rows`` rows, distinct blocks in [0, cols).  ``kv_major``: rows
    are query blocks listing key blocks (the forward's layout), else the transpose."""
    row_kind, col_kind = ("query", "key") if kv_major else ("key", "query")
    idx_name = name.replace("num_blocks", "indices")
    for what, t in ((name, num), (idx_name, idx)):
        if not isinstance(t, torch.Tensor):
            raise AttentionInputError(f"block table {what} must be a torch.Tensor, got "
                                      f"{type(t).__name__}")
        if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise AttentionInputError(f"block table {what} has dtype {t.dtype}; expected an "
                                      f"integer dtype (torch.int32, as BlockMask's tables)")
        if t.device != device and t.device.type == "meta":
            raise AttentionInputError(f"block table {what} is on {t.device} (no values); "
                                      f"expected the inputs' device {device}")
    # tables on another device are moved, as the forward's launcher does
    num, idx = num.to(device), idx.to(device)
    if num.dim() != 3 or idx.dim() != 4 or tuple(num.shape) != tuple(idx.shape[:3]):
        raise AttentionInputError(f"block tables {name} must be [B, H, rows] and {idx_name} "
                                  f"[B, H, rows, blocks], got {list(num.shape)} and "
                                  f"{list(idx.shape)}")
    for d, want in enumerate(heads):
        if num.shape[d] not in (1, want):
            raise AttentionInputError(f"block table {name} dim {d} is {num.shape[d]}; "
                                      f"expected 1 or {want}")
    if num.shape[2] < rows:
        raise AttentionInputError(f"block table {name} has {num.shape[2]} rows; the inputs "
                                  f"need {rows} {row_kind}-block rows")
    counts = num[..., :rows]
    if counts.numel() and (int(counts.min()) < 0 or int(counts.max()) > idx.shape[3]):
        raise AttentionInputError(f"block table {name} holds counts in [{int(counts.min())}, "
                                  f"{int(counts.max())}]; they must lie in [0, "
                                  f"{idx.shape[3]}] (the columns of {idx_name})")
    listed = torch.arange(idx.shape[3], device=device) < counts[..., None]
    vals = idx[..., :rows, :][listed]
    if vals.numel() and (int(vals.min()) < 0 or int(vals.max()) >= cols):
        raise AttentionInputError(f"block table {idx_name} lists blocks in "
                                  f"[{int(vals.min())}, {int(vals.max())}]; expected "
                                  f"{col_kind} blocks in [0, {cols})")
    if _lists_a_block_twice(num, idx, rows, cols):
        raise AttentionInputError(f"block table {idx_name} lists a block twice in one row; "
                                  f"each block must be listed at most once")
    return _block_matrix(num, idx, rows, cols)


def _check_disjoint(partial: torch.Tensor, full: torch.Tensor, major: str) -> None:
    """Refuse a block listed as both partial and full (block matrices of ``_checked_pair``):
    the kernels visit each listed block once per table, so it would be counted twice."""
    if bool((partial & full).any()):
        raise AttentionInputError(f"block tables {major}indices and full_{major}indices list "
                                  f"one block as both partial and full; each block must be in "
                                  f"at most one of them")


def _block_sizes(block_tables: dict) -> tuple[int, int]:
    """(Q_BLOCK_SIZE, KV_BLOCK_SIZE) of ``block_tables``, refused unless positive integers."""
    sizes = []
    for key in ("Q_BLOCK_SIZE", "KV_BLOCK_SIZE"):
        size = block_tables.get(key)
        if isinstance(size, bool) or not hasattr(size, "__index__") or size.__index__() <= 0:
            raise AttentionInputError(f"block_tables[{key!r}] is {size!r}; expected a "
                                      f"positive int (the block size the tables count in)")
        sizes.append(size.__index__())
    return sizes[0], sizes[1]


def _table_tiles(bm: int, bn: int, sparse_q: int, sparse_kv: int) -> tuple[int, int]:
    """The (BLOCK_M, BLOCK_N) tiles of a launch over block tables: each tile lies inside one
    block, so the config's tiles shrink to the largest power of two dividing the block sizes;
    refused when the blocks are not multiples of a tile >= 16 (tl.dot's smallest)."""
    bm, bn = min(bm, sparse_q & -sparse_q), min(bn, sparse_kv & -sparse_kv)
    if sparse_q % bm or sparse_kv % bn or min(bm, bn) < 16:
        raise AttentionInputError(f"block sizes ({sparse_q}, {sparse_kv}) must be multiples of "
                                  f"a power-of-two tile >= 16; the tile is ({bm}, {bn})")
    return bm, bn
# <<< block-tables


# >>> tile-kernel
# Binding of a Tile IR kernel's extents and parameters (codegen/launch_common.py).

def _sizes(inputs: dict, captured: dict) -> dict:
    """Every extent's size, read off the tensors; a disagreement is an error."""
    sizes, seen = {}, {}
    tensors = {**inputs, **captured}
    for tensor, dims in TENSOR_DIMS.items():  # noqa: F821
        t = tensors.get(tensor)
        if t is None:
            continue
        if t.dim() != len(dims):
            raise AttentionInputError(f"{tensor} must have {len(dims)} dims [{', '.join(dims)}], "
                                      f"got shape {tuple(t.shape)}")
        for ext, size in zip(dims, t.shape):
            if sizes.setdefault(ext, int(size)) != int(size):
                shapes = {n: tuple(x.shape) for n, x in tensors.items()
                          if n in TENSOR_DIMS}  # noqa: F821
                raise AttentionInputError(f"extent {ext} is {sizes[ext]} (from {seen[ext]}) "
                                          f"but {tensor} has {int(size)}; shapes: {shapes}")
            seen.setdefault(ext, tensor)
    return sizes


def _checked_params(params: dict | None) -> dict:
    """``params`` by name, refused unless each names a parameter the spec declares
    (PARAM_TYPES; a misspelt name would leave the parameter at its default, silently; the
    extents are read off the tensors, never given) and holds a number of its type, None
    meaning the default: an int parameter takes an integer that int64 holds (2.0 and 2.5 are
    refused, not truncated), a float one any real.  The values come back as Python ints and
    floats."""
    import numbers

    if params is None:
        return {}
    if not isinstance(params, dict):
        raise AttentionInputError(f"params must be a dict of parameter values by name, got "
                                  f"{type(params).__name__}")
    out = {}
    for name, value in params.items():
        if name not in PARAM_TYPES:  # noqa: F821
            raise AttentionInputError(f"params names {name!r}, which is not a parameter of "
                                      f"this kernel; its parameters are "
                                      f"{sorted(PARAM_TYPES)}")  # noqa: F821
        if value is None:
            continue
        want = PARAM_TYPES[name]  # noqa: F821
        kind = numbers.Integral if want == "int" else numbers.Real
        if isinstance(value, bool) or not isinstance(value, kind):
            raise AttentionInputError(f"parameter {name!r} is {value!r} "
                                      f"({type(value).__name__}); expected "
                                      f"{'an int' if want == 'int' else 'a real number'}")
        if want == "int" and not -2**63 <= value < 2**63:  # the kernels' widest integer
            raise AttentionInputError(f"parameter {name!r} is {value}; expected an int in "
                                      f"[-2**63, 2**63) (the kernels compute in int64)")
        out[name] = int(value) if want == "int" else float(value)
    return out


def _bind(inputs: dict, captured: dict, params: dict | None) -> tuple[dict, dict]:
    """(the size of each index or None, every parameter's value, extents included): the
    defaults, the extents, a float scale = 1/sqrt(qk dim) unless given or declared with a
    default, G = query heads per key/value
    head, then ``params`` (:func:`_checked_params`); an unbound parameter or heads that do
    not group are errors, and so is a CONSTEXPR_PARAMS value outside int32 (Triton refuses
    such a constant against the int32 head index, in the compiler and the interpreter)."""
    params = _checked_params(params)
    sizes = _sizes(inputs, captured)
    ext = {i: sizes.get(e) for i, e in INDEX_EXTENTS.items()}  # noqa: F821
    _, n_heads, _, _, e_len, _ = _lengths(ext)
    values = dict(PARAM_DEFAULTS)  # noqa: F821
    values.update(sizes)
    if "scale" in PARAMS and params.get("scale") is None and "scale" not in values \
            and PARAM_TYPES.get("scale") == "float":  # noqa: F821 - a declared default wins
        values["scale"] = 1.0 / math.sqrt(e_len)
    if "G" in PARAMS and "HKV" in sizes:  # noqa: F821
        n_kv = sizes["HKV"]  # no heads at all (0 and 0) is an empty problem, not an error
        if (n_kv == 0) != (n_heads == 0) or n_kv and n_heads % n_kv:
            raise AttentionInputError(f"{n_heads} query heads cannot be grouped over "
                                      f"{n_kv} key/value heads")
        values["G"] = n_heads // n_kv if n_kv else 1
    values.update(params)
    for p in PARAMS:  # noqa: F821
        if p not in values:
            raise AttentionInputError(f"parameter {p!r} is not bound; pass it in params")
    for p in CONSTEXPR_PARAMS:  # noqa: F821
        if not -2**31 <= values[p] < 2**31:
            raise AttentionInputError(
                f"parameter {p!r} is {values[p]}; expected an int in [-2**31, 2**31): the "
                f"kernel compiles it as a constant of its int32 head arithmetic")
    return ext, values


def _lengths(ext: dict) -> tuple[int, int, int, int, int, int]:
    """(batch, heads, M, N, E, F) of a launch from the size of each index: 1 for a batch or
    head index the spec lacks (a size of 0 stays 0: an empty problem, no launch) and for an
    absent qk or v dim."""
    n_batch, n_heads = (1 if ext.get(ROLES.get(r)) is None else ext[ROLES[r]]  # noqa: F821
                        for r in ("batch", "head"))
    return (n_batch, n_heads, ext[ROLES["query"]] or 0, ext[ROLES["key"]] or 0,  # noqa: F821
            ext.get(ROLES.get("qk")) or 1, ext.get(ROLES.get("v")) or 1)  # noqa: F821
# <<< tile-kernel


# >>> by-name
# Launch by keyword (codegen/launch_common.py): KERNEL_ARGS names each kernel's runtime arguments.

def _by_name(name: str, values: list) -> dict:
    """The runtime arguments of the kernel ``name`` by keyword, ``values`` in the order of
    ``KERNEL_ARGS[name]``: a count that differs is an error, never a shifted argument."""
    names = KERNEL_ARGS[name]  # noqa: F821
    if len(names) != len(values):
        raise RuntimeError(f"{name} takes {len(names)} runtime arguments, the launcher built "
                           f"{len(values)}")
    return dict(zip(names, values))
# <<< by-name
