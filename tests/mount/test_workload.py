"""A long random workload on the mount, checked step by step against a model."""

from __future__ import annotations

import os
import random

import pytest

from scenarios.harness import NodeProcess

pytestmark = [pytest.mark.mount, pytest.mark.slow]

BLOCK = 128 * 1024
OPS = 5000
FILES = 4


def test_random_read_write_truncate_reopen_fsync_matches_model(node: NodeProcess) -> None:
    seed = int(os.environ.get("DFS_WORKLOAD_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    mnt = node.mountpoint
    model: dict[str, bytearray] = {}
    fds: dict[str, int] = {}

    def offset_near_blocks(size: int) -> int:
        # offsets cluster around block boundaries, where the bugs live
        if rng.random() < 0.5 and size:
            return rng.randrange(0, size + 1)
        k = rng.randrange(0, 6)
        return max(0, k * BLOCK + rng.randrange(-3, 4))

    for step in range(OPS):
        name = f"f{rng.randrange(FILES)}"
        path = mnt / name
        what = rng.random()
        ctx = f"seed={seed} step={step} op on {name}"
        if name not in fds:
            fds[name] = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            model.setdefault(name, bytearray())
        fd = fds[name]
        data = model[name]
        if what < 0.40:
            off = offset_near_blocks(len(data))
            buf = rng.randbytes(rng.choice([1, 7, 512, 4096, BLOCK - 1, BLOCK + 3, 300_000]))
            assert os.pwrite(fd, buf, off) == len(buf), ctx
            if off > len(data):
                data.extend(bytes(off - len(data)))
            data[off : off + len(buf)] = buf
        elif what < 0.70:
            off = offset_near_blocks(len(data))
            n = rng.choice([1, 100, 4096, BLOCK, 2 * BLOCK + 5])
            got = os.pread(fd, n, off)
            assert got == bytes(data[off : off + n]), ctx
        elif what < 0.80:
            size = rng.choice([0, 1, BLOCK - 1, BLOCK, BLOCK + 1, rng.randrange(0, 5 * BLOCK)])
            os.ftruncate(fd, size)
            if size < len(data):
                del data[size:]
            else:
                data.extend(bytes(size - len(data)))
        elif what < 0.88:
            os.close(fd)
            del fds[name]
        elif what < 0.94:
            os.fsync(fd)
        else:
            assert os.fstat(fd).st_size == len(data), ctx
            assert path.stat().st_size == len(data), ctx
    for fd in fds.values():
        os.close(fd)
    for name, data in model.items():
        assert (mnt / name).read_bytes() == bytes(data), f"seed={seed} final {name}"
    node.stop()
    node.start()
    for name, data in model.items():
        assert (mnt / name).read_bytes() == bytes(data), f"seed={seed} after restart {name}"
