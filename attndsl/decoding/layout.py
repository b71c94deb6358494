"""K/V as the kernel reads them: a physical sequence of rows, without copying.

* A dense cache ``[B, Hkv, N, D]`` (any strides) is read as it is, at batch ``b' // S``.
* A page pool ``[num_pages, page_size, Hkv, D]`` (``"NPHD"``) or ``[num_pages, Hkv,
  page_size, D]`` (``"NHPD"``) is viewed as ONE sequence ``[1, Hkv, N, D]`` of physical rows:
  row ``n`` of head ``h`` is at ``n * row_stride + h * head_stride``, so page ``p`` starts at
  row ``p * PW`` with ``PW = page_stride / row_stride`` (``PW = page_size`` for NPHD,
  ``Hkv * page_size`` for NHPD; the rows between pages then belong to other heads and are
  never listed).  ``N = (num_pages - 1) * PW + page_size`` keeps the view inside the pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attndsl.runtime.checks import AttentionError

Tensor = torch.Tensor
LAYOUTS = {"NPHD": (1, 2), "NHPD": (2, 1)}  # layout -> (row dim, head dim) of the pool


@dataclass(frozen=True)
class PhysicalKV:
    """K and V as ``[BKV, Hkv, N, D]`` views; ``page``/``pw`` are the page size and the rows
    from one page's start to the next (both N for a dense cache: one page per sequence)."""

    k: Tensor
    v: Tensor
    page: int
    pw: int
    paged: bool


def _pool_view(pool: Tensor, layout: str, name: str) -> tuple[Tensor, int, int]:
    if layout not in LAYOUTS:
        raise AttentionError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    if pool.dim() != 4:
        raise AttentionError(f"{name} pages must be 4-D ({layout}), got {tuple(pool.shape)}")
    row, head = LAYOUTS[layout]
    n_pages, page, heads, dim = pool.shape[0], pool.shape[row], pool.shape[head], pool.shape[3]
    s_page, s_row = pool.stride(0), pool.stride(row)
    if n_pages == 0 or page == 0:
        raise AttentionError(f"{name} pages {tuple(pool.shape)} hold no rows")
    if s_row <= 0 or s_page % s_row or s_page // s_row < page:
        raise AttentionError(
            f"{name} pages ({layout}, strides {pool.stride()}): a page's stride must be a "
            f"multiple of the row stride, at least page_size rows; make the pool contiguous")
    pw = s_page // s_row
    rows = (n_pages - 1) * pw + page
    view = pool.as_strided((1, heads, rows, dim), (0, pool.stride(head), s_row, pool.stride(3)),
                           pool.storage_offset())
    return view, page, pw


def paged_kv(k_pages: Tensor, v_pages: Tensor, layout: str = "NPHD") -> PhysicalKV:
    """The physical-sequence views of a K and a V page pool (same pages, page size, heads)."""
    k, page, pw = _pool_view(k_pages, layout, "key")
    v, v_page, v_pw = _pool_view(v_pages, layout, "value")
    if (page, k.shape[1], k.shape[2]) != (v_page, v.shape[1], v.shape[2]) or pw != v_pw:
        raise AttentionError(f"key pages {tuple(k_pages.shape)} and value pages "
                             f"{tuple(v_pages.shape)} must have the same pages, page size, "
                             f"heads and layout")
    return PhysicalKV(k, v, page, pw, True)


def dense_kv(key: Tensor, value: Tensor) -> PhysicalKV:
    """A dense cache ``[B, Hkv, N, D]``: read in place (every sequence is its own page)."""
    n = key.shape[2]
    return PhysicalKV(key, value, n, n, False)


__all__ = ["LAYOUTS", "PhysicalKV", "dense_kv", "paged_kv"]
