"""bench/edge.py with slowhttptest: the tool really carries our key, its reports are read
right, and a short run end to end against a real `auraserve serve`."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from tests.bench.loader import bench_module

edge = bench_module("edge")
needs_slowhttptest = pytest.mark.skipif(
    edge.SLOWHTTPTEST is None, reason="slowhttptest is not installed (Debian package)"
)

# Console and CSV of a real run (slowhttptest 1.8.2 -H -c 2000 -r 200 -i 10 -l 20 against
# `auraserve serve`), colours left in: the console colours every field.
CONSOLE = (
    "\x1b[0mWed Dec  2 03:50:47 2026:\x1b[1;32m\nslow HTTP test status on \x1b[0;32m20\x1b[1;32mth"
    " second:\n\n\x1b[1;32minitializing:\x1b[1;32m        0\n\x1b[1;32mpending:     \x1b[1;32m"
    "        0\n\x1b[1;32mconnected:   \x1b[1;32m        524\n\x1b[1;32merror:       \x1b[1;32m"
    "        0\n\x1b[1;32mclosed:      \x1b[1;32m        1476\n\x1b[0mWed Dec  2 03:50:48 2026:"
    "\x1b[0;36m\nTest ended on 21th second\nExit status:\x1b[1;36m Hit test time limit\n\x1b[0m"
)
CSV = """Seconds,Closed,Pending,Connected,Service Available
0,0,1,0,2000
5,0,1,857,2000
10,0,1,1632,2000
11,174,1,1603,2000
15,849,0,1151,0
20,1626,0,374,2000
21,1775,0,225,2000
"""


def test_reports_are_read() -> None:
    assert edge.parse_slowhttptest_log(CONSOLE) == {
        "errors": 0,
        "socket_init_failures": 0,
        "exit_status": "Hit test time limit",
        "lowered_connections_to": None,
    }
    stats = edge.parse_slowhttptest_csv(CSV)
    assert stats["connected_max"] == 1632 and stats["closed"] == 1775
    assert stats["opened"] == 2000 and stats["connected_at_end"] == 225
    assert stats["connected_every_5s"] == [0, 857, 1632, 1151, 374]
    assert stats["probe_unavailable_s"] == 1
    with pytest.raises(ValueError, match="not a slowhttptest CSV"):
        edge.parse_slowhttptest_csv("not,a,report\n")


@needs_slowhttptest
def test_slow_bodies_carry_the_key(tmp_path: Path) -> None:
    """slowhttptest 1.8 has no option for a header; the bench puts ours after a CRLF in the
    cookie. A listener sees what the tool really sends."""
    received: list[bytes] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)

        def read_all() -> None:
            # Its probe (a GET) and the slow POST, in either order.
            for _ in range(2):
                conn, _ = listener.accept()
                conn.settimeout(2.5)
                data = b""
                try:
                    while chunk := conn.recv(65536):
                        data += chunk
                except TimeoutError:
                    pass
                conn.close()
                received.append(data)

        reader = threading.Thread(target=read_all)
        reader.start()
        args = {
            "port": listener.getsockname()[1],
            "key": "aura_0123456789abcdef_secret",
            "rate": 1,
            "ramp": 1.0,
            "duration": 2.0,
            "header_interval": 10.0,
            "body_interval": 1.0,
        }
        command = edge.slowhttptest_command("bodies", 1, args, tmp_path / "bodies")
        subprocess.run(command, capture_output=True, timeout=30, check=True)
        reader.join(15)
    (post,) = [data for data in received if data.startswith(b"POST ")]
    head, _, body = post.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/images/generations HTTP/1.1"
    assert b"Authorization: Bearer aura_0123456789abcdef_secret" in lines
    assert b"Content-Length: 1000000" in lines and b"Content-Type: application/json" in lines
    assert body.startswith(b"foo=bar")  # then its paced "&name=value" pairs


@needs_slowhttptest
def test_edge_smoke_with_slowhttptest(tmp_path: Path) -> None:
    out = tmp_path / "edge.json"
    edge.main(
        [
            "--attacker", "slowhttptest",
            "--connections", "40",
            "--bodies", "10",
            "--duration", "2",
            "--ramp", "1",
            "--phases", "headers,bodies",
            "--out", str(out),
        ]
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["attacker"] == "slowhttptest"
    # The bodies' command line is recorded with the server's key left out.
    assert "Bearer <key>" in report["bodies"]["attack"]["command"]
    assert re.search(r"aura_[0-9a-f]{16}_", out.read_text()) is None
    for phase, connections in (("headers", 40), ("bodies", 10)):
        result = report[phase]
        attack = result["attack"]
        assert attack["attacker"] == "slowhttptest" and attack["connections"] == connections
        assert 0 < attack["connected_max"] <= connections and attack["errors"] == 0, attack
        assert attack["exit_status"] == "Hit test time limit"
        assert attack["attacker_cpu_cores"] >= 0
        for prober in ("health", "account"):
            assert result[prober]["requests"] > 0 and result[prober]["failures"] == 0
