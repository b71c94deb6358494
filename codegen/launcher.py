# ruff: noqa: F821
# The launcher of every generated module.  The printer copies this text, below the kernel and
# the metadata tables (OPERANDS, CAPTURED, PARAMS, OUTPUTS, ROLES, EXTENTS, INDEX_EXTENTS,
# PARAM_DEFAULTS, HAS_MASK) it reads, into the module.  It needs only torch and triton.

_KERNELS: dict = {}


class AttentionInputError(ValueError):
    """Inputs that do not fit the kernel: the message says what was expected."""


def _kernel(device_type: str):
    """The kernel, compiled for GPUs, or run by Triton's interpreter for CPU tensors."""
    if device_type not in _KERNELS:
        if device_type == "cpu":
            from triton.runtime.interpreter import InterpretedFunction

            if not isinstance(tl.zeros, InterpretedFunction):
                raise AttentionInputError(
                    "CPU tensors run in Triton's interpreter, which needs TRITON_INTERPRET=1 "
                    "in the environment before triton is first imported")

            _KERNELS[device_type] = InterpretedFunction(attention_fwd_kernel)
        else:
            from triton.runtime.jit import JITFunction

            _KERNELS[device_type] = JITFunction(attention_fwd_kernel)
    return _KERNELS[device_type]


def default_config(head_dim: int, v_dim: int, dtype: torch.dtype, device_type: str,
                   passes: int = 1) -> dict:
    """Tile sizes and launch settings: BLOCK_M x BLOCK_N tiles, warps and pipeline stages."""
    if device_type == "cpu":  # the interpreter runs numpy: larger tiles, fewer programs
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    wide = max(head_dim, v_dim)
    if wide <= 64:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    if wide <= 128:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _sizes(inputs: dict, captured: dict) -> dict:
    sizes = {}
    tensors = {**inputs, **captured}
    for ext, (tensor, dim) in EXTENTS.items():
        if tensor in tensors:
            size = int(tensors[tensor].shape[dim])
            if sizes.setdefault(ext, size) != size:
                raise AttentionInputError(f"extent {ext} is {sizes[ext]} but {tensor} has {size}")
    for tensor, t in tensors.items():
        for d, size in enumerate(t.shape):
            ext = next((e for e, (tn, dd) in EXTENTS.items() if tn == tensor and dd == d), None)
            if ext is not None and sizes[ext] != int(size):
                raise AttentionInputError(f"{tensor} dim {d} has size {int(size)}, expected "
                                          f"{ext} = {sizes[ext]}")
    return sizes


def _check(inputs: dict, captured: dict) -> torch.device:
    device = None
    for name, (_, side, _, _) in OPERANDS.items():
        if name not in inputs:
            raise AttentionInputError(f"missing input tensor {name!r} ({side}-side operand)")
        t = inputs[name]
        if not isinstance(t, torch.Tensor):
            raise AttentionInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise AttentionInputError(f"{name} has dtype {t.dtype}; expected float16, bfloat16 "
                                      f"or float32")
        device = device or t.device
        if t.device != device:
            raise AttentionInputError(f"{name} is on {t.device} but other inputs are on {device}")
    dtypes = {inputs[n].dtype for n in OPERANDS}
    if len(dtypes) > 1:
        raise AttentionInputError(f"inputs must share one dtype, got "
                                  f"{ {n: str(inputs[n].dtype) for n in OPERANDS} }")
    for name, (_, rank) in CAPTURED.items():
        if name not in captured:
            raise AttentionInputError(f"missing captured tensor {name!r}")
        t = captured[name]
        if t.dim() != rank:
            raise AttentionInputError(f"captured {name} must have {rank} dims, got {t.dim()}")
        if t.device != device:
            raise AttentionInputError(f"captured {name} is on {t.device}, inputs on {device}")
    return device


def launch(inputs: dict, params: dict | None = None, captured: dict | None = None,
           block_tables: dict | None = None, config: dict | None = None) -> dict:
    """Run the kernel.  ``inputs``/``captured`` map tensor names to tensors, ``params`` scalar
    names to values.  ``block_tables`` (optional) holds kv_num_blocks, kv_indices,
    full_kv_num_blocks, full_kv_indices shaped [B or 1, H or 1, rows(, cols)] and
    Q_BLOCK_SIZE/KV_BLOCK_SIZE.  Returns every output by name."""
    captured = dict(captured or {})
    device = _check(inputs, captured)
    sizes = _sizes(inputs, captured)
    ext = {i: sizes.get(e) for i, e in INDEX_EXTENTS.items()}
    q_idx, k_idx = ROLES["query"], ROLES["key"]
    e_len, f_len = ext.get(ROLES.get("qk")) or 1, ext.get(ROLES.get("v")) or 1
    n_batch = ext.get(ROLES.get("batch")) or 1
    n_heads = ext.get(ROLES.get("head")) or 1
    m_len, n_len = ext[q_idx], ext[k_idx]
    values = dict(PARAM_DEFAULTS)
    values.update(sizes)
    if "scale" in PARAMS and (params or {}).get("scale") is None:
        values["scale"] = 1.0 / math.sqrt(e_len)
    if "G" in PARAMS and "HKV" in sizes:
        if sizes["HKV"] == 0 or n_heads % sizes["HKV"]:
            raise AttentionInputError(f"{n_heads} query heads cannot be grouped over "
                                      f"{sizes['HKV']} key/value heads")
        values["G"] = n_heads // sizes["HKV"]
    values.update({k: v for k, v in (params or {}).items() if v is not None})
    for p in PARAMS:
        if p not in values:
            raise AttentionInputError(f"parameter {p!r} is not bound; pass it in params")
    dtype = next(iter(inputs.values())).dtype
    cfg = dict(default_config(e_len, f_len, dtype, device.type))
    cfg.update(config or {})
    out = {}
    for name, (_, idx, tile) in OUTPUTS.items():
        shape = [ext[i] if i in ext and ext[i] is not None else 1 for i in idx]
        out[name] = torch.empty(shape, device=device, dtype=dtype if tile else torch.float32)
    if m_len == 0 or n_batch * n_heads == 0:
        return out
    sparsity = 1 if HAS_MASK else 0
    tables = []
    sparse_q = sparse_kv = 1
    if block_tables is not None:
        sparsity = 2
        sparse_q, sparse_kv = int(block_tables["Q_BLOCK_SIZE"]), int(block_tables["KV_BLOCK_SIZE"])
        cfg["BLOCK_M"] = min(cfg["BLOCK_M"], sparse_q)
        cfg["BLOCK_N"] = min(cfg["BLOCK_N"], sparse_kv)
        if sparse_q % cfg["BLOCK_M"] or sparse_kv % cfg["BLOCK_N"]:
            raise AttentionInputError(f"block sizes ({sparse_q}, {sparse_kv}) must be multiples "
                                      f"of the tile ({cfg['BLOCK_M']}, {cfg['BLOCK_N']})")
        for key in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
            t = block_tables.get(key)
            if t is None:  # no full blocks: every listed block is partial
                t = torch.zeros([1, 1, 1] + ([1] if "indices" in key else []),
                                dtype=torch.int32, device=device)
            t = t.to(device=device, dtype=torch.int32)
            strides = [0 if t.shape[d] == 1 and d < 2 else t.stride(d) for d in range(t.dim())]
            tables += [t] + strides
    else:
        dummy = torch.zeros(4, dtype=torch.int32, device=device)
        tables = [dummy, 0, 0, 0, dummy, 0, 0, 0, 0] * 2
    args = []
    for name, (_, _, _, _) in OPERANDS.items():
        t = inputs[name]
        args += [t] + [t.stride(d) for d in range(t.dim())]
    for name in CAPTURED:
        t = captured[name]
        if t.dtype == torch.bool:
            t = t.to(torch.int8)
        args += [t] + [t.stride(d) for d in range(t.dim())]
    for name in OUTPUTS:
        t = out[name]
        args += [t] + [t.stride(d) for d in range(t.dim())]
    args += [values[p] for p in PARAMS]
    args += [n_heads, m_len, n_len, e_len, f_len] + tables
    grid = (triton.cdiv(m_len, cfg["BLOCK_M"]), n_batch * n_heads)
    _run(device.type, grid, args, cfg, e_len, f_len, n_len, sparsity, sparse_q, sparse_kv, dtype)
    return out


def _run(device_type, grid, args, cfg, e_len, f_len, n_len, sparsity, sparse_q, sparse_kv,
         dtype) -> None:
    _kernel(device_type)[grid](
        *args, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_E=max(16, _next_pow2(e_len)), BLOCK_F=max(16, _next_pow2(f_len)),
        EVEN_N=n_len % cfg["BLOCK_N"] == 0, SPARSITY=sparsity, SPARSE_Q=sparse_q,
        SPARSE_KV=sparse_kv, DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        UPCAST=device_type == "cpu" and dtype == torch.bfloat16,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
              return_all: bool = False, params: dict | None = None,
              captured: dict | None = None, block_tables: dict | None = None,
              config: dict | None = None):
    """Positional form for the usual three operands: returns the first output, or every
    output by name with ``return_all=True``."""
    sides = {side: name for name, (_, side, _, _) in OPERANDS.items()}
    if len(OPERANDS) != 3 or set(sides) != {"q", "k", "v"}:
        raise AttentionInputError(f"this kernel reads {sorted(OPERANDS)}; call launch() with "
                                  f"a dict of inputs")
    inputs = {sides["q"]: query, sides["k"]: key, sides["v"]: value}
    out = launch(inputs, params, captured, block_tables, config)
    return out if return_all else next(iter(out.values()))
