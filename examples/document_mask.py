"""Document (packed-sequence) masking: several documents packed into one sequence attend
causally within their own document only (sequence packing, e.g. Krell et al. 2021).

Document ids are sorted random ids (about 4 documents) captured as tensors.  With Lq == Lkv
queries and keys share one id tensor; otherwise the queries get their own id tensor of length
Lq, drawn the same way, so some query rows may have no visible key (output 0, lse -inf).
"""

from __future__ import annotations

import torch
from _common import MaskMod, and_masks, causal_mask, demo, generator

NUM_DOCS = 4


def document_ids(length: int, num_docs: int, gen: torch.Generator) -> torch.Tensor:
    """Sorted random document ids in [0, num_docs) for ``length`` positions (int64)."""
    return torch.sort(torch.randint(0, num_docs, (length,), generator=gen)).values


def generate_doc_mask(q_doc: torch.Tensor, kv_doc: torch.Tensor) -> MaskMod:
    """Query and key belong to the same document."""

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                 kv_idx: torch.Tensor) -> torch.Tensor:
        return q_doc[q_idx] == kv_doc[kv_idx]

    mask_mod.__name__ = "document"
    return mask_mod


def make(B: int, H: int, Lq: int, Lkv: int, device: str | torch.device = "cpu") -> dict:
    """Returns {"score_mod": None, "mask_mod": same document & causal}."""
    gen = generator()
    kv_doc = document_ids(Lkv, NUM_DOCS, gen).to(device)
    q_doc = kv_doc if Lq == Lkv else document_ids(Lq, NUM_DOCS, gen).to(device)
    return {"score_mod": None, "mask_mod": and_masks(generate_doc_mask(q_doc, kv_doc), causal_mask)}


if __name__ == "__main__":
    demo(make)
