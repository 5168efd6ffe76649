"""Pure, deterministic core of dfs-peer: clocks, operations and their merge.

No I/O, no asyncio, no clock reads: every function is a function of its
arguments, so every merge rule can be tested in microseconds and replayed.
"""
