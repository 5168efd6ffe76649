"""The FUSE side of dfs-peer: a thin pyfuse3 adapter over a `Volume`.

This package is a leaf: it imports pyfuse3 and the standard library only, never
`peer`. What it needs from the volume is declared in `fuse.protocol.Volume`; the
errors a volume raises, and their one translation to errno, are in
`fuse.errors`; `fuse.adapter.FuseOperations` turns requests into volume calls;
`fuse.mount.serve` owns the mount's lifetime.

`fuse.errors` and `fuse.protocol` do not import pyfuse3 at import time, so a
volume (and its tests) can use them on a machine without libfuse.
"""
