"""How the forward kernel moves its tiles: pointer loads, or Hopper tensor descriptors (TMA).

Two load strategies print from the same Tile IR, selected per launch by the constexpr ``TMA``
(a launch option, not a global flag):

* pointer loads (every target): ``_load_tile(base + rows * stride_r + cols * stride_c, ...)``,
  masked along the axes that can run past the tensor;
* tensor descriptors (sm90+): per (batch, head) program one 2-D descriptor per tile operand,
  ``tl.make_tensor_descriptor(base, [rows_len, cols_len], [stride_r, 1], [BLOCK_R, BLOCK_C])``;
  a key tile is ``desc_k.load([start_n, 0]).T``.  The TMA unit pads reads outside
  ``[rows_len, cols_len]`` with 0: exactly the ``other=0.0`` of the pointer path, so both give
  the same numbers and the descriptor reads need no masks.

Outputs are stored through pointers on both paths.  A descriptor store of the [BLOCK_M,
BLOCK_F] output tile stages it in shared memory from registers, and triton 3.6 and 3.8 keep
the fp32 accumulator live beside the staged copy: the sm90 D=128 dense kernel took 218
(3.6) and 198 (3.8) registers with it against 140 and 138 with the pointer store; triton 3.9
gives 138 either way (static SASS, 128x64 tiles, 8 warps).

A descriptor has constraints the hardware checks, not the compiler: 16-byte aligned base (so
every stride of a batch/head dim a program offsets by is a multiple of 16 bytes), 16-byte
aligned row stride, unit last stride, block dims <= 256.  :func:`tma_choice` (copied into every
generated module, between the ``# >>> runtime`` markers) checks them on the actual tensors at
launch and answers (use TMA, reason): a launch that violates one falls back to pointer loads,
with the reason recorded by the launcher (``LOAD_PATH``) -- never a wrong answer.  Device-side
descriptors live in global scratch memory that the launch allocates through
``triton.set_allocator``: :func:`ensure_allocator` sets a torch allocator unless the
application has set one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from attndsl.codegen.writer import section

TMA_FLAG = "TMA"  # the kernel's constexpr: True = tensor descriptors, False = pointer loads


@dataclass(frozen=True)
class Descriptor:
    """One 2-D tile view read through a tensor descriptor.

    ``name`` is the kernel variable (``desc_k``), ``base`` the program's base pointer
    expression (batch/head offsets applied), ``shape`` the extents (``N_len``, ``E_len``),
    ``row_stride`` the stride argument of the row dim and ``block`` the constexpr tile sizes;
    ``ptr`` is the kernel pointer argument the launcher checks (with ``row_dim``, ``col_dim``
    of that tensor)."""

    name: str
    ptr: str
    base: str
    shape: tuple[str, str]
    row_stride: str
    block: tuple[str, str]
    row_dim: int
    col_dim: int

    def make(self) -> str:
        """The ``tl.make_tensor_descriptor`` call (the last stride is 1: checked at launch)."""
        return (f"{self.name} = tl.make_tensor_descriptor({self.base}, [{', '.join(self.shape)}]"
                f", [{self.row_stride}, 1], [{', '.join(self.block)}])")


def descriptor_setup(descs: list[Descriptor]) -> str:
    """Kernel-scope source that binds each descriptor name: the descriptor under ``TMA``, else
    the base pointer (unused by the pointer path; it keeps the step functions' arguments the
    same in both specialisations, and the compiler drops it)."""
    if not descs:
        return ""
    lines = ["if TMA:  # Hopper tensor descriptors (TMA) of this (batch, head): rows past the",
             "    # tensor read as 0 (the pointer path's masks)"]
    lines += [f"    {d.make()}" for d in descs]
    lines += ["else:  # pointer loads"]
    lines += [f"    {d.name} = {d.base}" for d in descs]
    return "\n".join(lines)


def tile_load(var: str, desc: Descriptor | None, row0: str, pointer_load: str,
              transpose: bool = False) -> str:
    """``var = `` one tile: through ``desc`` at rows ``[row0, row0 + block)`` when TMA is on
    (``.T`` for a key tile read as [cols, rows]), else ``pointer_load``."""
    if desc is None:
        return f"{var} = {pointer_load}"
    read = f"{desc.name}.load([{row0}, 0])" + (".T" if transpose else "")
    return f"if TMA:\n    {var} = {read}\nelse:\n    {var} = {pointer_load}"


def descriptor_table(descs: list[Descriptor], per_key_reads: bool) -> str:
    """``TMA_TENSORS``: kernel pointer -> (row dim, column dim, block constexprs) of every
    tensor a TMA launch reads through a descriptor (the launcher checks them), and
    ``PREFER_POINTERS``: why a launch by target default takes pointer loads ("" = it need not).

    ``per_key_reads``: the scores or sums read a captured tensor per key (a relative-bias
    table), on every key tile.  That load is an asynchronous copy (``cp.async``) beside the
    descriptor loads, and the compiled loop then waits on each wgmma (static SASS, sm90,
    triton 3.6, 3.8 and 3.9: 8 and 12 ``WARPGROUP.ARRIVE`` per D=64 / D=128 key tile where the
    pointer path and a hand-written kernel have 2), losing the overlap of the MMAs with the
    softmax; the pointer path keeps it.  Reads in the mask only (a document id) do not."""
    table = {d.ptr: (d.row_dim, d.col_dim, d.block) for d in descs}
    why = ("pointer loads: the scores read a captured tensor per key tile, an asynchronous "
           "copy beside descriptor loads that serialises the wgmma" if per_key_reads else "")
    return "# kernel pointer -> (row dim, column dim, block constexprs) of each descriptor\n" \
        f"TMA_TENSORS = {table!r}\n" \
        "# why a launch takes pointer loads by default (\"\": descriptors where they can)\n" \
        f"PREFER_POINTERS = {why!r}"


# the extents and block constexprs of a tile by the side it is read on: (rows, columns)
_TILE = {"q": (("M_len", "E_len"), ("BLOCK_M", "BLOCK_E")),
         "k": (("N_len", "E_len"), ("BLOCK_N", "BLOCK_E")),
         "v": (("N_len", "F_len"), ("BLOCK_N", "BLOCK_F"))}


def operand_descriptor(var: str, side: str, ptr: str, strides: tuple[str, ...], row_dim: int,
                       col_dim: int) -> Descriptor:
    """The descriptor of an operand tile ``var`` (its base pointer is ``base_<var>``)."""
    shape, block = _TILE[side]
    return Descriptor(f"desc_{var}", ptr, f"base_{var}", shape, strides[row_dim], block,
                      row_dim, col_dim)


def runtime_source() -> str:
    """The runtime part of this file, copied into every generated module."""
    return section(Path(__file__), "runtime")


# >>> runtime
def tma_choice(requested, device, tensors: dict, blocks: dict, prefer_pointers: str = ""
               ) -> tuple:
    """(use tensor descriptors, why) for one launch.

    ``requested`` is the config's ``tma`` (True / False / None = by target), ``tensors`` maps
    a descriptor's kernel pointer to (tensor, row dim, column dim, block constexprs) and
    ``blocks`` the constexpr tile sizes.  TMA needs sm90+ (or Triton's interpreter, which runs
    descriptors on the CPU when asked to), ``tl.make_tensor_descriptor`` in the installed
    triton, and per tensor: a 16-byte aligned base, unit stride along the columns, every other
    stride of a dim longer than 1 a multiple of 16 bytes (the row stride, and the batch/head
    offsets that move the base), blocks of at most 256 elements per dim.  A GPU launch that
    asks for neither takes pointer loads where :func:`pointer_default` says why (the module's
    PREFER_POINTERS, ``prefer_pointers``, or head-dim blocks of at most 64)."""
    import torch
    import triton
    import triton.language as tl

    if requested is False:
        return False, "pointer loads requested (config tma=False)"
    if not hasattr(tl, "make_tensor_descriptor"):
        return False, f"triton {triton.__version__} has no tl.make_tensor_descriptor"
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        if major < 9:
            return False, f"sm{major}x has no TMA (sm90+ only)"
    elif requested is not True:
        return False, f"{device.type} tensors: pointer loads unless tma=True is asked for"
    if requested is None and pointer_default(blocks, prefer_pointers):
        return False, pointer_default(blocks, prefer_pointers)
    for ptr, (t, _, col_dim, block) in tensors.items():
        size = t.element_size()
        if t.data_ptr() % 16:
            return False, f"{ptr}: base address not 16-byte aligned"
        if t.shape[col_dim] > 1 and t.stride(col_dim) != 1:
            return False, f"{ptr}: stride {t.stride(col_dim)} along the tile columns (dim " \
                f"{col_dim}), TMA needs 1"
        for d in range(t.dim()):
            if d != col_dim and t.shape[d] > 1 and (t.stride(d) * size) % 16:
                return False, f"{ptr}: stride {t.stride(d)} of dim {d} is " \
                    f"{t.stride(d) * size} bytes, not a multiple of 16"
        for b in block:
            if blocks[b] > 256:
                return False, f"{ptr}: {b}={blocks[b]} > 256, the TMA box limit"
    return True, "tensor descriptors (TMA)"


def pointer_default(blocks: dict, prefer_pointers: str = "") -> str:
    """Why a GPU launch that asks for no load path takes pointer loads ("": it takes tensor
    descriptors where the layout allows): the kernel's own reason (``prefer_pointers``, the
    module's PREFER_POINTERS), or head-dim blocks (``BLOCK_E``, ``BLOCK_F``) of at most 64.

    At 64 columns a key tile is 8 KiB, two 16-byte copies per thread of 8 warps, and the
    elected TMA issue with its barrier waits costs more than those: the descriptor key-tile
    loops took 5 to 67 more instructions (summed over a kernel's loops) than the pointer ones
    in every case of benchmarks/static_kernel.py (sm90, 128x64 tiles, triton 3.6, 3.8 and
    3.9; static SASS).  At 128 columns descriptors take at most 2 more instructions and 7 to
    33 fewer registers.  The autotuner of a GPU launch times both load paths."""
    if prefer_pointers:
        return prefer_pointers
    if max(blocks["BLOCK_E"], blocks["BLOCK_F"]) <= 64:
        return "pointer loads: head dims of at most 64, where the descriptor key-tile loop " \
            "is heavier (tma=True asks for descriptors)"
    return ""


def ensure_allocator() -> None:
    """Device-side descriptors are written to global scratch memory that the launch allocates
    through ``triton.set_allocator``; set a torch one unless the application has its own."""
    import torch
    import triton
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(lambda size, alignment, stream: torch.empty(
            size, device="cuda", dtype=torch.int8))
# <<< runtime
