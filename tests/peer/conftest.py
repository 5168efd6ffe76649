"""Fixtures shared by the tests of nodes in one process."""

from __future__ import annotations

import pytest

from peer.keys import VolumeKeys
from peer.secret import new_secret


@pytest.fixture
def keys() -> VolumeKeys:
    """The keys of a fresh volume, shared by every node a test makes."""
    return VolumeKeys.from_root(new_secret())
