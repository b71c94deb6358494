"""Runtime: the module cache, loading generated modules and calling them."""
