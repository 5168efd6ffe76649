"""Patches: a small write into a stored block is kept as the bytes it changed
over the whole block under it (`peer.sealing.Patch`), not as the block sealed
again. Real nodes in one process, real SQLite, real HTTP on loopback for the
peer that fetches them; forged patches are sealed with the volume's own keys,
as a member gone bad could."""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Callable
from pathlib import Path

import cbor2
import pytest

from crdt.ops import BLOCK_SIZE
from fuse.errors import Retry
from peer.errors import CorruptBlock
from peer.keys import VolumeKeys
from peer.node import Node
from peer.sealing import (
    MAX_PATCH_BYTES,
    MAX_PATCH_DEPTH,
    PATCH_VERSION,
    Patch,
    _seal_padded,
    open_sealed,
    patch_id,
    seal_block,
    seal_patch,
    whole_block_length,
)
from peer.storage.blocks import BlockCache, Blocks
from tests.peer.test_gc import current_blocks, make_node, rewrite, serving
from tests.peer.test_lost_blocks import read_range
from tests.peer.test_sync import CALLER, link, read_file, wait_until, write_file

SIZE = 3 * BLOCK_SIZE + 1000


def write_at(node: Node, name: bytes, offset: int, data: bytes) -> None:
    rewrite(node, name, data, offset)


def stored_file(tmp_path: Path, keys: VolumeKeys, *small_writes: int) -> bytearray:
    """Node A's file `f` (random bytes, then 4 KiB written at each of
    `small_writes`), with A stopped: its content."""
    a = make_node(tmp_path, "a", keys)
    try:
        content = bytearray(os.urandom(SIZE))
        write_file(a, b"f", bytes(content))
        for offset in small_writes:
            change = os.urandom(4096)
            write_at(a, b"f", offset, change)
            content[offset : offset + 4096] = change
    finally:
        a.close()
    return content


def reads_after_a_restart(tmp_path: Path, keys: VolumeKeys, content: bytes) -> None:
    """A restarted node (nothing cached, no block's shape known) reads `content`."""
    a = make_node(tmp_path, "a", keys)
    try:
        assert read_file(a, b"f") == content
    finally:
        a.close()


def test_a_small_write_into_a_large_file_stores_a_patch_not_the_block(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    a = make_node(tmp_path, "a", keys)
    try:
        content = bytearray(os.urandom(SIZE))
        write_file(a, b"f", bytes(content))
        before = a.store.stats()
        change = os.urandom(4096)
        write_at(a, b"f", BLOCK_SIZE + 5000, change)
        content[BLOCK_SIZE + 5000 : BLOCK_SIZE + 5000 + 4096] = change
        after = a.store.stats()
        assert after.blocks == before.blocks + 1
        # A sealed 4 KiB patch is ~8 KiB (its size class); the block was 128 KiB.
        assert after.block_bytes - before.block_bytes <= 8192 + 100
        assert read_file(a, b"f") == bytes(content)
        # Its base is the old block 1, which the file's new version no longer names.
        bases = a.store.patch_bases()
        assert len(bases) == 1
        ((patch, base),) = bases.items()
        assert patch in current_blocks(a, b"f")
        assert base not in current_blocks(a, b"f")
    finally:
        a.close()
    reads_after_a_restart(tmp_path, keys, bytes(content))


def test_patches_stack_at_most_four_deep_and_every_write_reads_back(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    a = make_node(tmp_path, "a", keys, keep_history_s=3600)
    try:
        content = bytearray(os.urandom(SIZE))
        write_file(a, b"f", bytes(content))
        rng = random.Random(7)
        for i in range(40):
            offset = rng.randrange(SIZE - 3000)
            data = os.urandom(rng.choice([1, 700, 3000]))
            write_at(a, b"f", offset, data)
            content[offset : offset + len(data)] = data
            if i % 10 == 9:
                a.close()  # forgets which blocks are patches: learnt again when read
                a = make_node(tmp_path, "a", keys, keep_history_s=3600)
            assert read_file(a, b"f") == bytes(content)
        # A small write stands on the block as it was, patch or not, without
        # reading it; a chain ends at MAX_PATCH_DEPTH, where one patch over the
        # whole block takes every change of it. Each patch's changes, and the
        # changes of a whole chain, stay under the bound (else the block is whole).
        bases = a.store.patch_bases()
        depths = {}
        for bid in bases:
            sealed = a.store.get_block(bid)
            assert sealed is not None
            patch = open_sealed(keys, bid, sealed)
            assert isinstance(patch, Patch)
            assert 1 <= patch.depth <= MAX_PATCH_DEPTH
            assert patch.changed() <= MAX_PATCH_BYTES
            depths[bid] = patch.depth
        for bid, base in bases.items():
            assert depths.get(base, 0) == depths[bid] - 1
        assert max(depths.values()) == MAX_PATCH_DEPTH  # chains formed...
        collapsed = [b for b, d in depths.items() if d == 1 and a.blocks.chain(b) is not None]
        over_root = {bases[b] for b in collapsed}
        assert len(collapsed) > len(over_root)  # ...and ended: a root with several depth-1 patches
    finally:
        a.close()


def test_a_patch_keeps_its_base_until_a_whole_rewrite_frees_both(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    a = make_node(tmp_path, "a", keys)  # no history kept: only what the file reads
    try:
        write_file(a, b"f", os.urandom(SIZE))
        write_at(a, b"f", 10, b"small")
        result = a.collector.collect()
        assert result.blocks_freed == 0  # the old block 0 is the patch's base
        assert a.store.stats().blocks == 5
        latest = os.urandom(SIZE)
        rewrite(a, b"f", latest)
        result = a.collector.collect()
        assert result.blocks_freed == 5  # four old blocks and the patch
        assert a.store.patch_bases() == {}
        assert read_file(a, b"f") == latest
    finally:
        a.close()


@pytest.mark.asyncio
async def test_a_fresh_peer_fetches_a_patch_and_the_block_under_it_and_again_if_it_goes_bad(
    tmp_path: Path, keys: VolumeKeys, expect_logs: Callable[..., None]
) -> None:
    a = make_node(tmp_path, "a", keys)
    async with contextlib.AsyncExitStack() as stack:
        sa = await stack.enter_async_context(serving(a))
        content = bytearray(os.urandom(SIZE))
        write_file(a, b"f", bytes(content))
        write_at(a, b"f", 2 * BLOCK_SIZE + 1, b"patched")
        content[2 * BLOCK_SIZE + 1 : 2 * BLOCK_SIZE + 8] = b"patched"
        a.collector.collect()
        ((patch, base),) = a.store.patch_bases().items()

        d = make_node(tmp_path, "d", keys)
        sd = await stack.enter_async_context(serving(d))
        link(sd, sa)
        await wait_until(lambda: a.journal.vv == d.journal.vv, "D to hold every op")
        await wait_until(lambda: len(d.store.has_blocks([patch, base])) == 2, "D to hold both")
        assert d.store.patch_bases() == {patch: base}
        assert read_file(d, b"f") == bytes(content)

        # The block under D's patch goes bad on disk: a read finds it through
        # the patch, removes it (not the patch) and asks A for it again.
        expect_logs(r"corrupt block id=\w+: removed from the store", level=logging.ERROR)
        expect_logs("unreadable here", logger="peer.volume")
        sealed = d.store.get_block(base)
        assert sealed is not None
        with d.store.transaction():
            d.store._conn.execute(
                "UPDATE blocks SET sealed = ? WHERE id = ?",
                (sealed[:-1] + bytes([sealed[-1] ^ 1]), base),
            )
        d.blocks.cache = BlockCache()
        with pytest.raises(Retry) as caught:
            read_range(d, b"f", 2 * BLOCK_SIZE, 100)
        assert await caught.value.wait()
        assert d.store.get_block(base) == sealed
        assert read_file(d, b"f") == bytes(content)


@pytest.mark.asyncio
async def test_a_fresh_peer_fetches_a_whole_chain_of_patches(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    a = make_node(tmp_path, "a", keys)  # no history kept: only what the file reads stays
    async with contextlib.AsyncExitStack() as stack:
        sa = await stack.enter_async_context(serving(a))
        content = bytearray(os.urandom(SIZE))
        write_file(a, b"f", bytes(content))
        for k in range(3):
            offset, change = BLOCK_SIZE + 1000 + k * 5000, b"change %d" % k
            write_at(a, b"f", offset, change)
            content[offset : offset + len(change)] = change
        a.collector.collect()
        bases = a.store.patch_bases()
        assert len(bases) == 3  # three patches, each on the one before, on block 1
        chain = set(bases) | set(bases.values())
        assert len(chain) == 4

        d = make_node(tmp_path, "d", keys)
        sd = await stack.enter_async_context(serving(d))
        link(sd, sa)
        await wait_until(lambda: a.journal.vv == d.journal.vv, "D to hold every op")
        await wait_until(lambda: d.store.has_blocks(chain) == chain, "D to hold the chain")
        assert d.store.patch_bases() == bases
        assert read_file(d, b"f") == bytes(content)


def _store_raw(node: Node, pairs: list[tuple[bytes, bytes]]) -> None:
    with node.store.transaction():
        node.store.put_blocks(pairs)


def test_forged_patches_do_not_open(
    tmp_path: Path, keys: VolumeKeys, expect_logs: Callable[..., None]
) -> None:
    """A member with the keys can seal anything: a chain that loops, a patch
    deeper than its base allows, a range outside the block, or a header that
    names another base than the patch does. Each is a corrupt block (and is
    removed), never a hang or wrong bytes."""
    expect_logs(r"corrupt block id=\w+: removed from the store", level=logging.ERROR)
    a = make_node(tmp_path, "a", keys)
    try:
        blocks = Blocks(a.store, keys)
        whole_id, whole = seal_block(keys, os.urandom(1000))
        x, y = os.urandom(32), os.urandom(32)
        # A loop: x over y, y over x (ids chosen, as a forger could store them).
        _, px = seal_patch(keys, Patch(y, 1, 10, ((0, b"a"),)))
        _, py = seal_patch(keys, Patch(x, 1, 10, ((0, b"b"),)))
        _store_raw(a, [(whole_id, whole), (x, px), (y, py)])
        with pytest.raises(CorruptBlock):
            blocks.get(x)
        # Depth 2 over a whole block (depth 0).
        deep_id, deep = seal_patch(keys, Patch(whole_id, 2, 1000, ((0, b"c"),)))
        _store_raw(a, [(deep_id, deep)])
        # No write stacks on it either: its shape and chain are not sound.
        fresh = Blocks(a.store, keys)
        assert fresh.shape(deep_id) is None
        assert fresh.chain(deep_id) is None
        with pytest.raises(CorruptBlock, match="its base is at depth 0"):
            blocks.get(deep_id)
        assert not a.store.has_blocks([deep_id]), "the forged patch stays in the store"
        # A range past the block's length.
        out_id, out = seal_patch(keys, Patch(whole_id, 1, 10, ((8, b"xyz"),)))
        with pytest.raises(CorruptBlock, match="outside the block"):
            open_sealed(keys, out_id, out)
        # A range whose bytes are a number (bytes(n) would make n zero bytes).
        for ranges in ([[0, 10**9]], [[0.5, b"x"]], "no ranges"):
            plaintext = cbor2.dumps([whole_id, 1, 1000, ranges])
            pid = patch_id(keys.current, plaintext)
            forged = bytes([PATCH_VERSION]) + whole_id + _seal_padded(keys, pid, plaintext)
            with pytest.raises(CorruptBlock, match=r"patch range|malformed patch"):
                open_sealed(keys, pid, forged)
        # The header names another base than the sealed patch does.
        good_id, good = seal_patch(keys, Patch(whole_id, 1, 1000, ((0, b"d"),)))
        swapped = good[:1] + os.urandom(32) + good[33:]
        with pytest.raises(CorruptBlock, match="another base"):
            open_sealed(keys, good_id, swapped)
        # A patch's id is not a block's id of the same bytes: neither passes for the other.
        with pytest.raises(CorruptBlock):
            open_sealed(keys, whole_id, good)
        assert open_sealed(keys, good_id, good) == Patch(whole_id, 1, 1000, ((0, b"d"),))
    finally:
        a.close()


def test_writes_truncates_and_reads_in_any_order_match_a_plain_buffer(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    """Small writes (kept as patches, or unread as sparse writes until a read,
    a truncate or a flush needs the block), large ones, truncates both ways,
    reads, flushes and restarts, against a bytearray doing the same."""
    rng = random.Random(11)
    a = make_node(tmp_path, "a", keys, keep_history_s=3600)
    ref = bytearray(os.urandom(SIZE))
    write_file(a, b"f", bytes(ref))
    vol = a.volume
    fh = vol.open(vol.lookup(1, b"f").inode, os.O_RDWR, CALLER)
    try:
        for step in range(600):
            roll = rng.random()
            if roll < 0.55:
                offset = rng.randrange(len(ref) + 2000)
                data = os.urandom(rng.choice([1, 17, 512, 4096, 9000, BLOCK_SIZE + 3]))
                vol.write(fh, offset, data)
                if offset > len(ref):
                    ref.extend(bytes(offset - len(ref)))
                ref[offset : offset + len(data)] = data
            elif roll < 0.75:
                offset = rng.randrange(len(ref) + 10)
                size = rng.choice([1, 100, 5000, BLOCK_SIZE * 2])
                assert vol.read(fh, offset, size) == bytes(ref[offset : offset + size]), step
            elif roll < 0.82:
                size = rng.randrange(max(1, len(ref) * 2))
                attrs = vol.lookup(1, b"f")
                vol.setattr(attrs.inode, size=size, fh=fh, caller=CALLER)
                ref = ref[:size] + bytes(max(0, size - len(ref)))
            elif roll < 0.95:
                vol.flush(fh)
            else:
                vol.release(fh)
                a.close()  # forgets every block's shape: learnt again when read
                a = make_node(tmp_path, "a", keys, keep_history_s=3600)
                vol = a.volume
                fh = vol.open(vol.lookup(1, b"f").inode, os.O_RDWR, CALLER)
        vol.release(fh)
        assert read_file(a, b"f") == bytes(ref)
        assert a.store.patch_bases(), "no write became a patch"
    finally:
        a.close()
    reads_after_a_restart(tmp_path, keys, bytes(ref))


def test_after_a_restart_a_small_write_into_a_full_block_does_not_open_it(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    content = stored_file(tmp_path, keys)
    a = make_node(tmp_path, "a", keys)  # nothing cached, no block's shape known
    try:
        old = current_blocks(a, b"f")
        write_at(a, b"f", BLOCK_SIZE + 10, b"new bytes")
        content[BLOCK_SIZE + 10 : BLOCK_SIZE + 19] = b"new bytes"
        # A full block shows in its sealed length: the write became a patch
        # over it without decrypting its 128 KiB.
        assert not any(a.blocks.cached(bid) for bid in old)
        ((patch, base),) = a.store.patch_bases().items()
        assert base in old
        assert patch in current_blocks(a, b"f")
        assert read_file(a, b"f") == bytes(content)
    finally:
        a.close()


def test_a_small_write_into_a_patched_block_stacks_on_it_and_reads_nothing(
    tmp_path: Path, keys: VolumeKeys
) -> None:
    content = stored_file(tmp_path, keys, BLOCK_SIZE + 4096, BLOCK_SIZE + 3 * 4096)
    a = make_node(tmp_path, "a", keys)  # nothing cached, no block's shape known
    try:
        read: list[bytes] = []
        get_block = a.store.get_block
        a.store.get_block = lambda bid: read.append(bid) or get_block(bid)  # type: ignore[method-assign]
        under = a.store.patch_bases()
        before = a.store.stats()
        change = os.urandom(4096)
        write_at(a, b"f", BLOCK_SIZE + 8 * 4096, change)
        content[BLOCK_SIZE + 8 * 4096 : BLOCK_SIZE + 9 * 4096] = change
        opened = list(read)
        # The new patch carries this write alone, over the patch block 1 was:
        # ~8 KiB stored, where one patch with every change would be ~16 KiB.
        (new,) = set(a.store.patch_bases()) - set(under)
        sealed = a.store.get_block(new)
        assert sealed is not None
        patch = open_sealed(keys, new, sealed)
        assert isinstance(patch, Patch)
        assert patch.depth == 3
        assert patch.base in under
        assert patch.changed() == 4096
        assert a.store.stats().block_bytes - before.block_bytes <= 8192 + 100
        # Only the patches under it were opened to learn its shape (a few KiB
        # each), never the 128 KiB block they stand on.
        assert opened
        assert set(opened) <= set(under)
        assert read_file(a, b"f") == bytes(content)
    finally:
        a.close()
    reads_after_a_restart(tmp_path, keys, bytes(content))


def test_a_block_written_over_whole_in_place_is_not_read(tmp_path: Path, keys: VolumeKeys) -> None:
    content = stored_file(tmp_path, keys)
    a = make_node(tmp_path, "a", keys)
    try:
        read: list[bytes] = []
        get_block = a.store.get_block
        a.store.get_block = lambda bid: read.append(bid) or get_block(bid)  # type: ignore[method-assign]
        new = os.urandom(BLOCK_SIZE)
        write_at(a, b"f", BLOCK_SIZE, new[:1000])  # a patch over block 1, not read
        write_at(a, b"f", BLOCK_SIZE, new)  # block 1 written over whole: nothing to read
        content[BLOCK_SIZE : 2 * BLOCK_SIZE] = new
        ((patch, _),) = a.store.patch_bases().items()
        assert patch not in current_blocks(a, b"f")  # block 1 is a whole block again
        assert read == [], "a block written over whole was read"
        assert read_file(a, b"f") == bytes(content)
    finally:
        a.close()


def test_only_a_full_block_tells_its_length_by_its_sealed_size(keys: VolumeKeys) -> None:
    full = seal_block(keys, os.urandom(BLOCK_SIZE))[1]
    short = seal_block(keys, os.urandom(BLOCK_SIZE - 1))[1]
    patch = seal_patch(keys, Patch(b"w" * 32, 1, BLOCK_SIZE, ((0, b"x"),)))[1]
    assert whole_block_length(len(full), full[0]) == BLOCK_SIZE
    assert whole_block_length(len(short), short[0]) is None
    assert whole_block_length(len(patch), patch[0]) is None
