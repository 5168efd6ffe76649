"""The FUSE side of dfs-peer: a thin pyfuse3 adapter over a `Volume`.

This package is a leaf: it imports pyfuse3 and the standard library only, never
`peer`. What it needs from the volume is declared in `fuse.protocol.Volume`; the
errors a volume raises, and their one translation to errno, are in
`fuse.errors`; `fuse.adapter.FuseOperations` turns requests into volume calls;
`fuse.mount.serve` owns the mount's lifetime.

`fuse.errors` and `fuse.protocol` do not import pyfuse3 at import time, so a
volume (and its tests) can use them on a machine without libfuse.
"""

import importlib
import importlib.util
import sys
import types
from typing import Any


class _TrioOnDemand(types.ModuleType):
    """Stands in for `trio` until something asks it for anything; then trio
    is imported, whole, and answers (here and in `sys.modules`) from then on."""

    def __getattr__(self, name: str) -> Any:
        if sys.modules.get("trio") is self:
            del sys.modules["trio"]
        return getattr(importlib.import_module("trio"), name)


def _defer_trio() -> None:
    """Put off importing `trio` until it is used.

    pyfuse3 imports trio when it is imported, but once `pyfuse3.asyncio.enable()`
    has run (`fuse.mount` does it) it calls asyncio stand-ins and never touches
    trio: importing it cost a node 5.8 MiB of resident memory for nothing.
    (`importlib.util.LazyLoader` cannot do this on Python 3.11: the import
    statement reads the module's `__spec__`, which loads it.)
    """
    if "trio" in sys.modules:
        return
    spec = importlib.util.find_spec("trio")
    if spec is None:
        return  # pyfuse3's own import then says what is missing
    stub = _TrioOnDemand("trio")
    stub.__spec__ = spec
    sys.modules["trio"] = stub


_defer_trio()
