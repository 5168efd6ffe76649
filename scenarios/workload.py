"""Files a scenario writes through a mount: reproducible bytes, corpora of many files.

Contents come from a seeded generator, so a failing run can be repeated byte
for byte; they are random enough that no two blocks are equal (equal blocks
are stored and sent once, which would flatter every figure).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 20


def payload(seed: int | str, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def write_file(path: Path, data: bytes) -> None:
    """Write the whole file and close it (the close is what publishes it)."""
    with open(path, "wb") as f:
        f.write(data)


def write_large(path: Path, size: int, seed: int | str) -> None:
    """A file of `size` random bytes, written in 1 MiB pieces."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(CHUNK, left)
            f.write(rng.randbytes(n))
            left -= n


@dataclass(frozen=True, slots=True)
class Corpus:
    files: int
    bytes: int
    dirs: int


def make_corpus(
    root: Path,
    files: int,
    *,
    dirs: int = 5,
    size: int = 4096,
    seed: int = 0,
    prefix: str = "corpus",
) -> Corpus:
    """`files` files of `size` bytes (or up to `size`, if negative: -4096 means
    0..4096), spread over `dirs` directories `<prefix>-<i>` under `root`."""
    rng = random.Random(seed)
    total = 0
    for d in range(dirs):
        os.mkdir(root / f"{prefix}-{d}")
    for i in range(files):
        n = size if size >= 0 else rng.randint(0, -size)
        data = rng.randbytes(n)
        write_file(root / f"{prefix}-{i % dirs}" / f"file-{i:05d}.bin", data)
        total += n
    return Corpus(files=files, bytes=total, dirs=dirs)
