"""POSIX details of `peer.volume.Volume` checked without a mount: the errno a
call must give, and what a call leaves in the merged state."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fuse.errors import Exists, NotPermitted
from peer.keys import VolumeKeys
from peer.node import Node
from peer.volume import ROOT_INODE
from tests.peer.test_sync import make_node, write_file


@pytest.fixture
def node(tmp_path: Path, keys: VolumeKeys) -> Iterator[Node]:
    made = make_node(tmp_path, "a", keys)
    try:
        yield made
    finally:
        made.close()


def test_link_onto_an_existing_name_is_eexist_before_eperm(node: Node) -> None:
    write_file(node, b"a", b"A")
    write_file(node, b"b", b"B")
    inode = node.volume.lookup(ROOT_INODE, b"a").inode
    with pytest.raises(Exists):
        node.volume.link(inode, ROOT_INODE, b"b")
    with pytest.raises(NotPermitted):
        node.volume.link(inode, ROOT_INODE, b"c")
    assert sorted(os.fsdecode(n) for n, _ in node.volume.readdir(ROOT_INODE, 0)) == ["a", "b"]
