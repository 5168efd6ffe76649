"""What a mount shows, as a value: snapshots of trees and readable differences.

A `Tree` maps each relative path under a mount to what a user sees there: the
kind, the permission bits, and for files the size and the sha256 of the bytes,
for symlinks the target. Two mounts have converged when their trees are equal.
Only ordinary file calls are used (os.walk, lstat, open, readlink), the way a
user's programs see the mount.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

READ_CHUNK = 1 << 20
DIFF_LINES = 30


@dataclass(frozen=True, slots=True)
class Entry:
    kind: str  # "file", "dir", "symlink" or "other"
    mode: int  # permission bits
    size: int = 0  # files only
    sha256: str | None = None  # files, when contents were read
    target: str | None = None  # symlinks

    def describe(self) -> str:
        parts = [self.kind, f"{self.mode:04o}"]
        if self.kind == "file":
            parts.append(f"{self.size:,} B")
            if self.sha256 is not None:
                parts.append(f"sha256 {self.sha256[:12]}")
        if self.target is not None:
            parts.append(f"-> {self.target}")
        return " ".join(parts)


Tree = dict[str, Entry]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def snapshot(root: Path, contents: bool = True) -> Tree:
    """The tree under `root`; without `contents`, only kinds, modes and sizes.

    Raises OSError if the tree changes under the walk (an entry vanishes
    between listing and lstat): the caller decides whether to look again.
    """
    tree: Tree = {}

    def fail(exc: OSError) -> None:
        raise exc

    for dirpath, dirnames, filenames in os.walk(root, onerror=fail):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            st = os.lstat(path)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                tree[rel] = Entry("dir", mode)
            elif stat.S_ISLNK(st.st_mode):
                tree[rel] = Entry("symlink", mode, target=os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                digest = file_sha256(path) if contents else None
                tree[rel] = Entry("file", mode, st.st_size, digest)
            else:
                tree[rel] = Entry("other", mode)
    return tree


def diff(trees: Mapping[str, Tree], limit: int = DIFF_LINES) -> str:
    """Where the trees differ, each compared with the first; '' if all equal."""
    names = list(trees)
    if not names:
        return ""
    ref_name = names[0]
    ref = trees[ref_name]
    lines: list[str] = []
    for name in names[1:]:
        other = trees[name]
        if other == ref:
            continue
        lines.append(f"{ref_name} ({len(ref)} entries) vs {name} ({len(other)} entries):")
        shown = 0
        for path in sorted(ref.keys() | other.keys()):
            a, b = ref.get(path), other.get(path)
            if a == b:
                continue
            if shown == limit:
                lines.append("    ... (more differences not shown)")
                break
            shown += 1
            if b is None:
                assert a is not None
                lines.append(f"    only on {ref_name}: {path} ({a.describe()})")
            elif a is None:
                lines.append(f"    only on {name}: {path} ({b.describe()})")
            else:
                lines.append(f"    {path}: {ref_name} {a.describe()} | {name} {b.describe()}")
    return "\n".join(lines)


def summary(tree: Tree) -> str:
    """'2,003 entries: 2,000 files (7.8 MiB), 3 dirs'."""
    files = [e for e in tree.values() if e.kind == "file"]
    dirs = sum(1 for e in tree.values() if e.kind == "dir")
    links = sum(1 for e in tree.values() if e.kind == "symlink")
    size = sum(e.size for e in files)
    text = f"{len(tree):,} entries: {len(files):,} files ({human_bytes(size)}), {dirs:,} dirs"
    if links:
        text += f", {links:,} symlinks"
    return text


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
