"""The status page, in a real headless chromium: peers, sync, members and the
collection horizon, conflict copies, a file's history, live updates, and 403
without the token. A screenshot is left in test-artefacts/status-page.png."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from scenarios.harness import NodeProcess, dfs_peer_command, free_port, wait_for
from tests.mount.cdp import chromium, headless

pytestmark = [pytest.mark.mount, pytest.mark.slow]

ARTEFACTS = Path(os.environ.get("DFS_PEER_ARTEFACTS", Path(__file__).parents[2] / "test-artefacts"))


def _open_url(node: NodeProcess) -> str:
    out = subprocess.run(
        [*dfs_peer_command(), "open", "--print", "--data-dir", str(node.data_dir)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return out.stdout.strip()


def _conflicted_pair(
    make_node: Callable[..., NodeProcess],
) -> tuple[NodeProcess, NodeProcess]:
    """Two nodes that wrote the same file while apart: a conflict copy on both."""
    pa, pb = free_port(), free_port()
    a = make_node("alpha", ["--listen", f"127.0.0.1:{pa}", "--peer", f"127.0.0.1:{pb}"]).start()
    b = make_node("beta", ["--listen", f"127.0.0.1:{pb}", "--peer", f"127.0.0.1:{pa}"]).start()
    (a.mountpoint / "notes.txt").write_text("first draft\n")
    wait_for(lambda: (b.mountpoint / "notes.txt").exists(), 20, "notes.txt on beta")
    b.stop()
    (a.mountpoint / "notes.txt").write_text("alpha's edit\n")
    a.stop()
    b.start()
    (b.mountpoint / "notes.txt").write_text("beta's edit, longer\n")
    a.start()

    def conflicted() -> bool:
        return any(".conflict-" in p.name for p in a.mountpoint.iterdir())

    wait_for(conflicted, 30, "a conflict copy on alpha")
    return a, b


@pytest.mark.skipif(chromium() is None, reason="chromium is not installed (.ci/setup does)")
def test_status_page_in_a_browser(make_node: Callable[..., NodeProcess], tmp_path: Path) -> None:
    a, b = _conflicted_pair(make_node)
    url = _open_url(a)
    page = a.status()["page"]
    assert url.startswith(page + "?token=")
    assert url.endswith((a.data_dir / "page.token").read_text().strip())
    # Without the token: 403, for the page and its JSON alike.
    for path in ("", "api/status", "page.js"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(page + path, timeout=10)
        refused.value.close()
        assert refused.value.code == 403

    async def drive() -> None:
        async with headless(tmp_path / "chromium") as browser:
            # Another host name: no cookie there, no token: refused.
            await browser.navigate(page.replace("127.0.0.1", "localhost"))
            assert "403" in await browser.evaluate("document.body.innerText")

            await browser.navigate(url)
            # The token went into a cookie and out of the address bar.
            assert await browser.evaluate("location.href") == page
            await browser.wait_for(
                "document.getElementById('peers').innerText.includes('connected')"
                " && document.getElementById('peers').innerText.includes('beta')",
                "beta shown connected",
            )
            await browser.wait_for(
                "document.getElementById('sync').innerText.includes('up to date')",
                "the sync state",
            )
            members = await browser.evaluate("document.getElementById('members').innerText")
            assert "alpha (this node)" in members
            assert "beta" in members
            horizon = await browser.evaluate("document.getElementById('horizon').innerText")
            assert "horizon" in horizon
            conflicts = await browser.wait_for(
                "document.getElementById('conflicts').innerText.includes('.conflict-')"
                " && document.getElementById('conflicts').innerText",
                "the conflict copy",
            )
            assert "/notes.conflict-" in conflicts
            assert "/notes.txt" in conflicts
            assert "alpha" in conflicts
            assert "beta" in conflicts

            # A file's history, asked from the page.
            await browser.evaluate(
                "document.getElementById('historypath').value = 'notes.txt';"
                "document.getElementById('historyform').requestSubmit(); true"
            )
            rows = await browser.wait_for(
                "document.querySelectorAll('#history tr').length >= 3"
                " && document.getElementById('history').innerText",
                "three versions of notes.txt",
            )
            assert "current" in rows
            assert "conflict copy" in rows

            # Live: a file written now shows without a reload.
            before = await browser.evaluate("document.getElementById('node').innerText")
            (b.mountpoint / "new.txt").write_text("hello\n")
            await browser.wait_for(
                f"document.getElementById('node').innerText !== {json.dumps(before)}"
                " && document.getElementById('live').innerText.startsWith('live')",
                "the page to update by itself",
            )
            await asyncio.sleep(2.5)  # one more poll, so the screenshot is settled
            shot = await browser.screenshot()
            (tmp_path / "status-page.png").write_bytes(shot)

    asyncio.run(drive())
    shot = tmp_path / "status-page.png"
    assert shot.stat().st_size > 20_000  # a page with text, not a blank
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTEFACTS / "status-page.png")
