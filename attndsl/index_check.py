"""Index ranges of tensor subscripts: interval rules over Python numbers, and the check.

Every read ``t[i0, i1, ..]`` of a captured (or input) tensor evaluates its subscripts at every
point of the kernel's index space.  Before a launch, each subscript's range is bounded by
interval arithmetic from what the launch knows -- the extents (an index ``m`` of extent M
spans [0, M - 1]), the parameter values, and for a subscript that reads data
(``bias[h, dist[b, m, n]]``) the [min, max] of the tensor it reads -- in O(1), plus
O(size) for each tensor read inside a subscript.

Semantics follow torch's indexing with a tensor of indices: a subscript ``i`` of a dimension
of size ``s`` is valid when ``-s <= i < s`` and a negative one wraps once (``t[-1]`` is the
last element); anything else raises :class:`IndexError` naming the tensor, the dimension,
the range seen and the size.  A bound is sound (it contains every value the subscript takes),
so a launch that passes the check never reads out of bounds.

An interval is a pair ``(lo, hi)`` of ints or floats with ``lo <= value <= hi``; ``None`` is
the empty set (an index of extent 0, an empty tensor: the subscript is never evaluated) and
``(-inf, inf)`` is unknown (which may be NaN).  Booleans are 0 / 1.

The text below the ``runtime`` marker is copied into every generated module (which needs only
torch); the printer (codegen/triton.py) emits, from the IR, a function that evaluates each
subscript's interval with these rules, and attndsl's own checks (the mask analysis) evaluate
the same rules on the IR directly (attndsl.passes.index_bounds).
"""

# >>> runtime
import math
import weakref

import torch

_INF = float("inf")
_UNKNOWN = (-_INF, _INF)


def _clean(lo, hi):
    """A NaN bound (inf - inf, NaN data) makes the value unknown."""
    if lo != lo or hi != hi:
        return _UNKNOWN
    return (lo, hi)


def _rule(fn):
    """An interval rule: empty in (an operand never evaluated), empty out; NaN -> unknown."""
    def apply(*args):
        if any(a is None for a in args):
            return None
        out = fn(*args)
        return None if out is None else _clean(*out)
    apply.__name__ = fn.__name__
    apply.__doc__ = fn.__doc__
    return apply


def _iv_index(size):
    """An index of extent ``size`` spans [0, size - 1] (empty when size is 0)."""
    if size is None:
        return _UNKNOWN
    size = int(size)
    return None if size <= 0 else (0, size - 1)


def _iv_param(value):
    """A scalar parameter's value (unknown when it is not bound)."""
    if value is None:
        return _UNKNOWN
    value = int(value) if isinstance(value, bool) else value
    return _clean(value, value)


_MINMAX: dict = {}


def _iv_tensor(t):
    """[min, max] of a tensor's values, O(size) (cached until the tensor is modified)."""
    if t.numel() == 0:
        return None
    key = id(t)
    hit = _MINMAX.get(key)
    if hit is not None and hit[0]() is t and hit[1] == t._version:
        return hit[2]
    x = t.detach()
    if x.dtype == torch.bool:
        x = x.to(torch.int8)
    lo, hi = (v.item() for v in torch.aminmax(x))
    iv = _clean(lo, hi) if x.is_floating_point() else (int(lo), int(hi))
    if len(_MINMAX) > 256:
        _MINMAX.clear()
    _MINMAX[key] = (weakref.ref(t), t._version, iv)
    return iv


def _times(x, y):
    return 0 if x == 0 or y == 0 else x * y


@_rule
def _iv_neg(a):
    """-x: [-hi, -lo]."""
    return (-a[1], -a[0])


@_rule
def _iv_abs(a):
    """|x|: [lo, hi] when lo >= 0, [-hi, -lo] when hi <= 0, else [0, max(-lo, hi)]."""
    lo, hi = a
    if lo >= 0:
        return a
    if hi <= 0:
        return (-hi, -lo)
    return (0, max(-lo, hi))


@_rule
def _iv_add(a, b):
    """x + y: [lo_x + lo_y, hi_x + hi_y]."""
    return (a[0] + b[0], a[1] + b[1])


@_rule
def _iv_sub(a, b):
    """x - y: [lo_x - hi_y, hi_x - lo_y]."""
    return (a[0] - b[1], a[1] - b[0])


@_rule
def _iv_mul(a, b):
    """x * y: a bilinear function takes its extremes at the corners (0 * inf = 0)."""
    c = [_times(x, y) for x in a for y in b]
    return (min(c), max(c))


def _one_sign(b):
    """The divisor keeps one sign and is finite: x / y is then monotone in x and in y."""
    return (b[0] > 0 or b[1] < 0) and math.isfinite(b[0]) and math.isfinite(b[1])


@_rule
def _iv_div(a, b):
    """x / y: the corners when y keeps one sign, else unknown."""
    if not _one_sign(b):
        return _UNKNOWN
    c = [x / y for x in a for y in b]
    return (min(c), max(c))


@_rule
def _iv_floordiv(a, b):
    """x // y = floor(x / y): monotone in x and in y when y keeps one sign (corners); a
    divisor that may be 0 or an unbounded operand gives unknown."""
    if not _one_sign(b) or not (math.isfinite(a[0]) and math.isfinite(a[1])):
        return _UNKNOWN
    c = [x // y if isinstance(x, int) and isinstance(y, int) else math.floor(x / y)
         for x in a for y in b]
    return (min(c), max(c))


def _mod(integer):
    @_rule
    def _iv_mod(a, b):
        """x % y (floor semantics, the sign of y): within one period of a constant y, lo % y
        .. hi % y; else [0, hi_y - 1] for y > 0 (integers; [0, hi_y] for floats), or x itself
        when 0 <= x < lo_y; the mirror image for y < 0; unknown when y may be 0."""
        gap = 1 if integer else 0
        fin = all(math.isfinite(v) for v in a + b)
        if not (math.isfinite(b[0]) and math.isfinite(b[1])) or b[0] <= 0 <= b[1]:
            return _UNKNOWN
        if fin and b[0] == b[1] and a[0] // b[0] == a[1] // b[0]:
            return (a[0] % b[0], a[1] % b[0])
        if b[0] > 0:
            return a if 0 <= a[0] and a[1] < b[0] else (0, b[1] - gap)
        return a if a[1] <= 0 and a[0] > b[1] else (b[0] + gap, 0)
    return _iv_mod


_iv_mod_int, _iv_mod_float = _mod(True), _mod(False)


@_rule
def _iv_max(a, b):
    """max(x, y): [max(lo), max(hi)]."""
    return (max(a[0], b[0]), max(a[1], b[1]))


@_rule
def _iv_min(a, b):
    """min(x, y): [min(lo), min(hi)]."""
    return (min(a[0], b[0]), min(a[1], b[1]))


@_rule
def _iv_pow(a, b):
    """x ** y for a constant y: an integer k >= 0 (|x| ** k when k is even, monotone when
    odd), or x > 0 (monotone in x); otherwise unknown."""
    if b[0] != b[1] or not math.isfinite(b[0]):
        return _UNKNOWN
    k = b[0]
    big = max(abs(a[0]), abs(a[1]))
    if big > 1 and k > 0 and k * math.log2(big) > 256:  # far past int64 and float32: the
        return _UNKNOWN  # bounds say nothing, and a Python int power of them may not finish
    try:
        if k == int(k) and k >= 0:
            k = int(k)
            if k % 2:
                return (a[0] ** k, a[1] ** k)
            m = _iv_abs(a)
            return (m[0] ** k, m[1] ** k)
        if a[0] > 0:
            c = [float(a[0]) ** k, float(a[1]) ** k]
            return (min(c), max(c))
    except OverflowError:
        pass
    return _UNKNOWN


def _monotone(fn):
    @_rule
    def rule(a):
        """f(x) for increasing f: [f(lo), f(hi)]; a domain error gives unknown."""
        try:
            return (fn(a[0]), fn(a[1]))
        except (ValueError, OverflowError):
            return _UNKNOWN
    return rule


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x)) if x > -700 else 0.0


def _exp(x):
    return math.exp(x) if x < 709 else _INF


_iv_exp = _monotone(_exp)
_iv_exp2 = _monotone(lambda x: 2.0 ** x if x < 1023 else _INF)
_iv_log = _monotone(lambda x: math.log(x) if x > 0 else (-_INF if x == 0 else math.nan))
_iv_log2 = _monotone(lambda x: math.log2(x) if x > 0 else (-_INF if x == 0 else math.nan))
_iv_tanh = _monotone(math.tanh)
_iv_sigmoid = _monotone(_sigmoid)
_iv_sqrt = _monotone(math.sqrt)
_TRUE, _FALSE, _MAYBE = (1, 1), (0, 0), (0, 1)


def _truth(always, never):
    return _TRUE if always else _FALSE if never else _MAYBE


@_rule
def _iv_lt(a, b):
    """x < y: always when hi_x < lo_y, never when lo_x >= hi_y."""
    return _truth(a[1] < b[0], a[0] >= b[1])


@_rule
def _iv_le(a, b):
    """x <= y: always when hi_x <= lo_y, never when lo_x > hi_y."""
    return _truth(a[1] <= b[0], a[0] > b[1])


@_rule
def _iv_gt(a, b):
    """x > y is y < x."""
    return _iv_lt(b, a)


@_rule
def _iv_ge(a, b):
    """x >= y is y <= x."""
    return _iv_le(b, a)


@_rule
def _iv_eq(a, b):
    """x == y: always when both are one and the same point, never when disjoint."""
    return _truth(a[0] == a[1] == b[0] == b[1], a[1] < b[0] or b[1] < a[0])


@_rule
def _iv_ne(a, b):
    """x != y: the negation of x == y."""
    return _iv_not(_iv_eq(a, b))


@_rule
def _iv_not(a):
    """~p (p == 0): always when p is the point 0, never when 0 is outside [lo, hi]."""
    return _truth(a == (0, 0), a[0] > 0 or a[1] < 0)


def _bitwise(is_and):
    @_rule
    def rule(a, b):
        """Integer & / |: exact at points; for x, y >= 0: x & y in [0, min(hi)], x | y in
        [max(lo), 2 ** bits(max(hi)) - 1]; otherwise unknown."""
        fin = all(math.isfinite(v) for v in a + b)
        if fin and a[0] == a[1] and b[0] == b[1]:
            v = int(a[0]) & int(b[0]) if is_and else int(a[0]) | int(b[0])
            return (v, v)
        if not fin or a[0] < 0 or b[0] < 0:
            return _UNKNOWN
        if is_and:
            return (0, min(a[1], b[1]))
        return (max(a[0], b[0]), (1 << int(max(a[1], b[1])).bit_length()) - 1)
    return rule


@_rule
def _iv_and_bool(a, b):
    """p & q: always iff both always, never iff one never."""
    return (min(a[0], b[0]), min(a[1], b[1]))


@_rule
def _iv_or_bool(a, b):
    """p | q: always iff one always, never iff both never."""
    return (max(a[0], b[0]), max(a[1], b[1]))


_iv_and_int, _iv_or_int = _bitwise(True), _bitwise(False)


@_rule
def _iv_xor_int(a, b):
    """Integer ^: exact at points; for x, y >= 0 in [0, 2 ** bits(max(hi)) - 1]; otherwise
    unknown."""
    fin = all(math.isfinite(v) for v in a + b)
    if fin and a[0] == a[1] and b[0] == b[1]:
        v = int(a[0]) ^ int(b[0])
        return (v, v)
    if not fin or a[0] < 0 or b[0] < 0:
        return _UNKNOWN
    return (0, (1 << int(max(a[1], b[1])).bit_length()) - 1)


@_rule
def _iv_xor_bool(a, b):
    """p ^ q: known when both are known, else either."""
    if a[0] == a[1] and b[0] == b[1]:
        v = int(bool(a[0]) != bool(b[0]))
        return (v, v)
    return (0, 1)


@_rule
def _iv_invert(a):
    """~x = -x - 1 (integers): decreasing."""
    return (-a[1] - 1, -a[0] - 1)


def _shift(left):
    @_rule
    def rule(a, b):
        """x << y, x >> y (int64): exact at points with 0 <= y < 64; x >> y for x >= 0 and
        y in [0, 63] lies in [lo >> max(y), hi >> min(y)]; otherwise unknown."""
        fin = all(math.isfinite(v) for v in a + b)
        if not fin or b[0] < 0 or b[1] > 63:
            return _UNKNOWN
        if a[0] == a[1] and b[0] == b[1]:
            v = int(a[0]) << int(b[0]) if left else int(a[0]) >> int(b[0])
            return (v, v) if -(1 << 63) <= v < (1 << 63) else _UNKNOWN
        if left or a[0] < 0:
            return _UNKNOWN
        return (int(a[0]) >> int(b[1]), int(a[1]) >> int(b[0]))
    return rule


_iv_lshift, _iv_rshift = _shift(True), _shift(False)


@_rule
def _iv_round(a):
    """round(x): monotone (an infinite bound stays infinite)."""
    return tuple(v if not math.isfinite(v) else round(v) for v in a)


_iv_truediv = _iv_div


@_rule
def _iv_cast_int(a):
    """int(x) truncates toward 0 (monotone); an unbounded x stays unknown."""
    if not (math.isfinite(a[0]) and math.isfinite(a[1])):
        return _UNKNOWN
    return (int(a[0]), int(a[1]))


@_rule
def _iv_cast_bool(a):
    """bool(x) is x != 0."""
    return _truth(a[0] > 0 or a[1] < 0, a == (0, 0))


@_rule
def _iv_cast_float(a):
    """float(x) is x."""
    return a


def _iv_where(c, a, b):
    """where(p, x, y): x when p is always true, y when never, else the hull of both (a
    branch that is never evaluated, None, adds nothing)."""
    if c is None:
        return None
    if c == _TRUE or b is None:
        return a
    if c == _FALSE or a is None:
        return b
    return (min(a[0], b[0]), max(a[1], b[1]))


def _finite(v):
    return v == v and v not in (_INF, -_INF)


def _meet(lo, hi):
    return None if lo > hi else (lo, hi)


@_rule
def _iv_meet(a, b):
    """The values in both a and b (None when disjoint)."""
    return _meet(max(a[0], b[0]), min(a[1], b[1]))


@_rule
def _iv_narrow_lt(x, k):
    """An integer x where x < k holds: x <= ceil(hi_k) - 1."""
    return _meet(x[0], min(x[1], math.ceil(k[1]) - 1)) if _finite(k[1]) else x


@_rule
def _iv_narrow_le(x, k):
    """An integer x where x <= k holds: x <= floor(hi_k)."""
    return _meet(x[0], min(x[1], math.floor(k[1]))) if _finite(k[1]) else x


@_rule
def _iv_narrow_gt(x, k):
    """An integer x where x > k holds: x >= floor(lo_k) + 1."""
    return _meet(max(x[0], math.floor(k[0]) + 1), x[1]) if _finite(k[0]) else x


@_rule
def _iv_narrow_ge(x, k):
    """An integer x where x >= k holds: x >= ceil(lo_k)."""
    return _meet(max(x[0], math.ceil(k[0])), x[1]) if _finite(k[0]) else x


@_rule
def _iv_narrow_eq(x, k):
    """An integer x where x == k holds: both narrowings."""
    return _iv_narrow_ge(_iv_narrow_le(x, k), k)


def _iv_row(*_):
    """A per-row kernel value (a dot product, a running sum): unknown before the launch."""
    return _UNKNOWN


def index_error(tensor, dim, shape, iv, text="", wraps=True):
    """The IndexError of a subscript whose range ``iv`` does not fit dimension ``dim``, or
    None when it fits: -size <= lo and hi < size where negatives wrap once (torch's rule,
    ``wraps``), else 0 <= lo and hi < size."""
    size = int(shape[dim])
    if iv is None or ((-size if wraps else 0) <= iv[0] and iv[1] < size):
        return None
    what = f" ({text})" if text else ""
    seen = "is unbounded" if not all(math.isfinite(v) for v in iv) else \
        f"takes values in [{iv[0]}, {iv[1]}]"
    if not size:
        valid = "none: the dimension is empty"
    elif wraps:
        valid = f"{-size} .. {size - 1}; negative ones count from the end"
    else:
        valid = f"0 .. {size - 1}"
    return IndexError(f"index out of range: subscript {dim}{what} of tensor {tensor!r} "
                      f"(shape {tuple(int(s) for s in shape)}) {seen}, but dimension {dim} has "
                      f"size {size} (valid indices: {valid})")


def check_index_ranges(sites, tensors):
    """Raise the IndexError of the first subscript out of range.  ``sites``: (tensor name,
    dim, interval, subscript text, negatives wrap) of every checked subscript."""
    for name, dim, iv, text, wraps in sites:
        t = tensors.get(name)
        if t is None:
            continue
        err = index_error(name, dim, tuple(t.shape), iv, text, wraps)
        if err is not None:
            raise err
# <<< runtime


def runtime_source() -> str:
    """The runtime part of this file, copied into every generated module."""
    from pathlib import Path

    text = Path(__file__).read_text()
    start = text.index("# >>> runtime\n") + len("# >>> runtime\n")
    return text[start: text.index("# <<< runtime\n")]


def rule_name(op: str, dtype: str, arg: object = None) -> str:
    """The name of the rule above for an IR operation (``Op`` name, node dtype, node arg)."""
    op = op.lower()
    if op == "cast":
        return f"_iv_cast_{arg}"
    if op == "mod":
        return "_iv_mod_int" if dtype == "int" else "_iv_mod_float"
    if op in ("and", "or", "xor"):
        return f"_iv_{op}_bool" if dtype == "bool" else f"_iv_{op}_int"
    return f"_iv_{op}"
