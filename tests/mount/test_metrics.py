"""/metrics: what a node counts, scraped and parsed with prometheus_client's own parser."""

from __future__ import annotations

import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from scenarios.harness import NodeProcess, dfs_peer_command, free_port, wait_for

pytestmark = pytest.mark.mount

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(node: NodeProcess, token: str | None = None, host: str | None = None) -> str:
    url = node.status()["page"] + "metrics"
    request = urllib.request.Request(url)
    if token is None:
        token = (node.data_dir / "page.token").read_text().strip()
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if host:
        request.add_header("Host", host)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode()


def samples(node: NodeProcess) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(scrape(node)):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(got: Samples, name: str, **labels: str) -> float:
    return got.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def pair(make_node: Callable[..., NodeProcess]) -> tuple[NodeProcess, NodeProcess]:
    pa, pb = free_port(), free_port()
    a = make_node("a", ["--listen", f"127.0.0.1:{pa}", "--peer", f"127.0.0.1:{pb}"]).start()
    b = make_node("b", ["--listen", f"127.0.0.1:{pb}", "--peer", f"127.0.0.1:{pa}"]).start()
    return a, b


def test_metrics_count_what_travels_between_two_nodes(
    pair: tuple[NodeProcess, NodeProcess],
) -> None:
    a, b = pair
    a_id, b_id = a.status()["short_id"], b.status()["short_id"]
    data = os.urandom(300_000)  # three distinct blocks
    (a.mountpoint / "f").write_bytes(data)
    wait_for(lambda: (b.mountpoint / "f").exists(), 20, "the file on b")
    wait_for(lambda: (b.mountpoint / "f").stat().st_size == 300_000, 20, "its content on b")
    assert (b.mountpoint / "f").read_bytes() == data
    subprocess.run([*dfs_peer_command(), "gc", "--data-dir", str(b.data_dir)], check=True)

    got = samples(b)
    ops = value(got, "dfs_peer_operations_received_total", peer=a_id)
    assert ops >= 2, sorted(k for k in got if "received" in k[0])
    assert value(got, "dfs_peer_blocks_received_total", peer=a_id) >= 3
    assert value(got, "dfs_peer_wire_bytes_total", direction="received") >= 300_000
    assert value(got, "dfs_peer_wire_bytes_total", direction="sent") > 0
    # The merge delay of a's operations here: one observation per operation.
    assert value(got, "dfs_peer_merge_delay_seconds_count", origin=a_id) == ops
    assert value(got, "dfs_peer_merge_delay_seconds_bucket", origin=a_id, le="+Inf") == ops
    assert 0 <= value(got, "dfs_peer_merge_delay_seconds_sum", origin=a_id) < 60 * ops
    assert value(got, "dfs_peer_fuse_request_seconds_count", operation="read") >= 1
    assert value(got, "dfs_peer_fuse_request_seconds_count", operation="lookup") >= 1
    assert value(got, "dfs_peer_collection_runs_total") >= 1
    assert ("dfs_peer_collection_freed_bytes_total", ()) in got
    assert value(got, "dfs_peer_operations_behind") == 0
    assert value(got, "dfs_peer_blocks_wanted") == 0
    assert value(got, "dfs_peer_store_bytes") > 300_000
    assert value(got, "dfs_peer_peers_connected") == 1

    sent = samples(a)
    assert value(sent, "dfs_peer_operations_sent_total", peer=b_id) >= ops
    assert value(sent, "dfs_peer_blocks_sent_total", peer=b_id) >= 3


def test_metrics_need_the_token_and_a_local_host_name(node: NodeProcess) -> None:
    for token, host in (("", None), ("wrong", None), (None, "evil.example:80")):
        with pytest.raises(urllib.error.HTTPError) as refused:
            scrape(node, token, host)
        refused.value.close()
        assert refused.value.code == 403
    assert "dfs_peer_operations " in scrape(node)
    assert node.status()["page"].startswith("http://127.0.0.1:")
    assert (node.data_dir / "page.token").stat().st_mode & 0o777 == 0o600


def test_page_port_in_use_is_refused_and_creates_nothing(tmp_path: Path, secret_file: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "m").mkdir()
        out = subprocess.run(
            [
                *dfs_peer_command(),
                "join",
                "--secret-file",
                str(secret_file),
                "--data-dir",
                str(tmp_path / "d"),
                "--no-mdns",
                "--listen",
                "127.0.0.1:0",
                "--page-port",
                str(port),
                str(tmp_path / "m"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode != 0
    assert out.stderr.strip() == (
        f"dfs-peer: the status page port 127.0.0.1:{port} is already in use: choose another "
        "with --page-port PORT (0 picks a free one)."
    )
    assert not (tmp_path / "d").exists()
