"""The .attn grammar (attn.lark) and its reference, shipped inside the package."""
