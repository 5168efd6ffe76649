"""A third machine joins by a one-time code and catches up.

A and B share a volume holding 300 files. `dfs-peer invite` on A prints a code;
C, a new machine given nothing but that code, runs `dfs-peer join --code`: on
a real LAN it finds A's invitation by mDNS, on loopback it is given A's and
B's addresses. Expected: `invite` says it paired with C and exits 0; C's
mount converges with A's and B's; a file written on C shows on A and B; C's
data dir holds the volume secret (mode 0600) and C restarts from it with no
secret given; the code cannot be used a second time.
"""

from __future__ import annotations

import stat

from scenarios.cluster import Cluster
from scenarios.invites import Invite, try_join
from scenarios.workload import make_corpus, write_file

NEEDS_REAL_LAN = False
FILES = 300


def run(c: Cluster) -> None:
    a, b = c.add("A"), c.add("B")
    joiner = c.add("C", paired=True)  # added now, so that on loopback it knows A and B
    late = c.add("D", paired=True)
    with c.report.step("started and mounted A, B"):
        c.start(a, b)
    with c.report.step(f"A wrote {FILES} files; B converged"):
        make_corpus(a.mount, FILES, dirs=3, size=-8192, seed=12)
        c.wait_converged([a, b], timeout=120)

    with Invite(a) as invite:
        with c.report.step("`dfs-peer invite` on A printed a code") as step:
            code = invite.code()
            step.text = f"`dfs-peer invite` on A printed the code {code}"
        how = "finding A by mDNS" if c.real_lan else "given A's and B's addresses"
        with c.report.step(f"C joined by the code ({how}) and mounted"):
            joiner.process.code = code
            c.start(joiner)
        with c.report.step("`dfs-peer invite` said it paired with C, and exited 0"):
            invite.wait_printed(r"paired with `C`")
            assert invite.wait() == 0, f"invite exited non-zero:\n{invite.output()}"
    c.report.note(f"invite printed:\n{invite.output()}")

    with c.report.step("C caught up with A and B") as step:
        tree = c.wait_converged([a, b, joiner], timeout=120)
        step.text = f"C caught up with A and B ({len(tree):,} entries)"
    with c.report.step("a file written on C shows on A and B"):
        write_file(joiner.path("from-c.txt"), b"written on the machine that joined by code\n")
        for node in (a, b):
            c.wait_file(node, "from-c.txt", b"written on the machine that joined by code\n")

    secret = joiner.process.data_dir / "volume.secret"
    mode = stat.S_IMODE(secret.stat().st_mode)
    assert mode == 0o600, f"C's stored secret has mode {mode:o}, not 600"
    assert secret.read_text().strip() == c.secret_file.read_text().strip(), (
        "the secret C stored is not the volume's"
    )
    with c.report.step("C restarted with no secret given (the one pairing stored)"):
        c.stop(joiner)
        c.restart(joiner)
        c.wait_converged([a, b, joiner], timeout=60)

    with c.report.step("the same code was refused to D"):
        out = try_join(c, late, code, a.host.address)
        assert "already used" in out.stderr, f"D was not told the code was used: {out.stderr!r}"
    assert not late.process.data_dir.exists() or not any(late.process.data_dir.iterdir()), (
        "a refused join left files in D's data dir"
    )
