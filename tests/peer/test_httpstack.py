"""`peer.httpstack`: aiohttp imported without the CA bundle, in a fresh
interpreter (the test process has imported aiohttp long before)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_PROBE = """
import json, os
from peer import httpstack
httpstack.load()
import aiohttp.connector as c
print(json.dumps({
    "verified": c._SSL_CONTEXT_VERIFIED.cert_store_stats()["x509"],
    "unverified": c._SSL_CONTEXT_UNVERIFIED.cert_store_stats()["x509"],
    "verify_mode": int(c._SSL_CONTEXT_VERIFIED.verify_mode),
    "env": os.environ.get("SSL_CERT_FILE"),
}))
"""


def probe(env: dict[str, str]) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def test_aiohttp_loads_no_ca_certificate_and_the_environment_is_put_back() -> None:
    base = {k: v for k, v in os.environ.items() if k != "SSL_CERT_FILE"}
    got = probe(base)
    assert got["verified"] == 0
    assert got["unverified"] == 0
    assert got["verify_mode"] == 2  # CERT_REQUIRED: an https request would be refused
    assert got["env"] is None
    mine = "/somewhere/my-ca.pem"
    assert probe({**base, "SSL_CERT_FILE": mine})["env"] == mine
