"""A cache of values computed from tensors (tile plans of masks), keyed so that it never aliases.

A key made of ``id(tensor)`` alone is wrong: once a tensor is freed, a new one may be allocated
at the same address (CPython reuses memory), and its lookups would hit the old tensor's entry.
Each tensor here is keyed either

* by **content** -- dtype, shape and a SHA-256 of its bytes -- when it is a CPU tensor of at
  most ``CONTENT_LIMIT`` bytes (hashing is cheap there and no device sync is needed): equal
  values share an entry whatever the tensor object, and in-place writes change the key; or
* by **identity** -- ``id``, the version counter (bumped by every in-place write, through any
  view), the data pointer, shape, strides and dtype -- with a weak reference to the tensor kept
  in the entry: a lookup matches only while that very object is alive (the reference is
  checked with ``is``), and the entry is dropped when the tensor is freed.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Hashable, Mapping
from typing import Any

import torch

CONTENT_LIMIT = 1 << 20  # bytes


def tensor_key(t: torch.Tensor) -> tuple[Hashable, bool]:
    """The key of one tensor and whether it is an identity key (needs a live reference)."""
    if t.device.type == "cpu" and t.layout == torch.strided and \
            t.numel() * t.element_size() <= CONTENT_LIMIT:
        data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return ("content", t.dtype, tuple(t.shape), hashlib.sha256(data).hexdigest()), False
    ptr = t.data_ptr() if t.layout == torch.strided and t.device.type != "meta" else 0
    return ("identity", id(t), t._version, ptr, tuple(t.shape), tuple(t.stride()), t.dtype,
            str(t.device)), True


class TensorKeyedCache:
    """A bounded dict from (hashable parts, named tensors) to values; see the module docstring.

    ``max_entries`` bounds memory: the cache is cleared when it would grow past it."""

    def __init__(self, max_entries: int = 64) -> None:
        self.max_entries = max_entries
        self._entries: dict[Hashable, tuple[tuple[weakref.ref, ...], Any]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def _key(self, parts: Hashable, tensors: Mapping[str, torch.Tensor]
             ) -> tuple[Hashable, list[torch.Tensor]]:
        keys, held = [], []
        for name in sorted(tensors):
            key, identity = tensor_key(tensors[name])
            keys.append((name, key))
            if identity:
                held.append(tensors[name])
        return (parts, tuple(keys)), held

    def get(self, parts: Hashable, tensors: Mapping[str, torch.Tensor]) -> Any | None:
        """The cached value, or None (also when an identity-keyed tensor is not the same
        object as the one the entry was made for)."""
        key, held = self._key(parts, tensors)
        entry = self._entries.get(key)
        if entry is None:
            return None
        refs, value = entry
        if len(refs) != len(held) or any(r() is not t for r, t in zip(refs, held)):
            return None
        return value

    def put(self, parts: Hashable, tensors: Mapping[str, torch.Tensor], value: Any) -> None:
        key, held = self._key(parts, tensors)
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        entries = self._entries

        def drop(ref: weakref.ref) -> None:  # the tensor died: its entry can never match
            entry = entries.get(key)
            if entry is not None and any(r is ref for r in entry[0]):
                del entries[key]

        self._entries[key] = (tuple(weakref.ref(t, drop) for t in held), value)
