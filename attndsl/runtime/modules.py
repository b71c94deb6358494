"""Generated modules: content-hashed source written to a cache directory and imported.

The cache lives in ``$ATTNDSL_CACHE`` (default ``~/.cache/attndsl``); a module's file name is
the hash of its source, so equal specs share one module and one Triton compilation.

Robustness: an entry is trusted only if its bytes equal the source it should hold -- a
corrupt, undecodable or truncated file, or a directory (or any other non-file) in its place,
is replaced.  Modules are executed from the verified source text, compiled here, never from
bytecode (``__pycache__`` is neither read nor written: a stale or truncated ``.pyc`` cannot
run).  The file stays on disk because Triton reads the kernel's source through it.  An
unusable cache directory (uncreatable, unwritable) falls back to a private temporary one,
with a one-line warning naming ``ATTNDSL_CACHE``.  Writes are atomic (a temporary file
renamed over the entry), so processes sharing a cache never see half a file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType

from attndsl.codegen.triton import generate
from attndsl.errors import AttnDSLError
from attndsl.ir.tile import TileKernel

VERSION = "0.1.0"
_LOADED: dict[str, ModuleType] = {}
_USABLE: dict[str, Path] = {}  # configured cache root -> the directory used for it


def _configured_root() -> str:
    return os.environ.get("ATTNDSL_CACHE") or os.path.join(Path.home(), ".cache", "attndsl")


def _probe(path: Path) -> None:
    """Create the directory and a file in it (raises OSError when either is impossible)."""
    path.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path, suffix=".probe")
    os.close(fd)
    os.unlink(tmp)


def cache_dir() -> Path:
    """The cache directory: ``$ATTNDSL_CACHE`` (or ``~/.cache/attndsl``) when it can be
    created and written, else a private temporary directory for this process (warned once)."""
    root = _configured_root()
    if root not in _USABLE:
        try:
            _probe(Path(root))
            _USABLE[root] = Path(root)
        except OSError as err:
            fallback = Path(tempfile.mkdtemp(prefix="attndsl-cache-"))
            warnings.warn(f"attndsl: cache directory ATTNDSL_CACHE={root!r} is unusable "
                          f"({err.strerror or err}); using {fallback} for this process",
                          RuntimeWarning, stacklevel=2)
            _USABLE[root] = fallback
    return _USABLE[root]


def spec_hash(kernel: TileKernel) -> str:
    """Hash of everything the kernel's code depends on (not of captured tensor values)."""
    return hashlib.sha256(repr(kernel).encode()).hexdigest()[:16]


def module_source(kernel: TileKernel) -> str:
    return generate(kernel, spec_hash(kernel), VERSION)


def _clear_non_file(path: Path) -> None:
    """Remove whatever non-regular file (a directory, a FIFO, a socket...) occupies path."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path, ignore_errors=True)  # another process may be removing it too
    elif not stat.S_ISREG(mode) and not stat.S_ISLNK(mode):
        path.unlink(missing_ok=True)


class ModuleWriteError(AttnDSLError, OSError):
    """A generated module cannot be written where the caller asked: the path is a directory
    (or another non-file) or cannot be written; the message names the path."""


def write_module(source: str, path: str | os.PathLike, *, cache_entry: bool = False) -> Path:
    """Write atomically (a concurrent reader never sees half a file).  A path held by a
    directory or another non-file is refused (:class:`ModuleWriteError`), never removed:
    it is the caller's (``attndsl compile -o DIR`` must not delete DIR).  Only the cache's
    own entries (``cache_entry=True``) replace whatever occupies their path, since a
    directory left in an entry's place would otherwise fail every later load."""
    path = Path(path)
    if cache_entry:
        return _write_file(source, path, clear=True)
    try:
        return _write_file(source, path, clear=False)
    except ModuleWriteError:
        raise
    except OSError as err:  # not writable, a parent that is a file, ...
        raise ModuleWriteError(f"cannot write the module to {path}: "
                               f"{err.strerror or err}") from None


def _write_file(source: str, path: Path, clear: bool) -> Path:
    """Write ``source`` to a temporary file beside ``path`` and rename it over ``path``;
    ``clear``: remove a non-file at ``path`` first, else refuse it."""
    if not clear and os.path.lexists(path) and not path.is_file():
        raise ModuleWriteError(f"cannot write the module to {path}: it exists and is not a "
                               f"regular file (a directory?); name a .py file")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(source)
        if clear:
            _clear_non_file(path)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _read_regular(path: Path) -> bytes | None:
    """The bytes of a regular file (symlinks followed), or None for anything else or an
    unreadable entry (never opens a FIFO, which would block)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        return path.read_bytes()
    except OSError:
        return None


def exec_source(source: str, path: str | os.PathLike, name: str) -> ModuleType:
    """A module made by compiling ``source`` (attributed to ``path``, where Triton and
    tracebacks read its lines) and executing it: no bytecode cache is involved."""
    module = ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module
    try:
        exec(compile(source, str(path), "exec"), module.__dict__)  # noqa: S102 - our source
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def import_path(path: str | os.PathLike, name: str | None = None) -> ModuleType:
    """Import a generated module from a file, from its current text (never a ``.pyc``)."""
    path = Path(path)
    name = name or f"attndsl_generated_{path.stem}"
    data = _read_regular(path)
    if data is None:
        raise ImportError(f"cannot import {path}: not a readable file")
    try:
        source = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ImportError(f"cannot import {path}: not UTF-8 text ({err.reason} at byte "
                          f"{err.start})") from None
    return exec_source(source, path, name)


def load_source(source: str, prefix: str = "k") -> ModuleType:
    """Import generated source, cached by content hash (in memory and in cache_dir()): the
    entry on disk is (re)written unless its bytes are exactly the source's."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    key = f"{prefix}_{digest}"
    if key not in _LOADED:
        path = cache_dir() / f"{key}.py"
        if _read_regular(path) != source.encode("utf-8"):
            write_module(source, path, cache_entry=True)
        _LOADED[key] = exec_source(source, path, f"attndsl_generated_{key}")
    return _LOADED[key]


def load_kernel_module(kernel: TileKernel) -> ModuleType:
    """The imported module for a kernel, generating and caching it on first use."""
    return load_source(module_source(kernel))
