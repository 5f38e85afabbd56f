"""Counting a task's established connections from the kernel's socket table."""

from __future__ import annotations

import os
import socket

from corral.agent.drain import connections, established_on

SAMPLE = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0B00007F:2400 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 0B00007F:2400 0C00007F:D4A2 01 00000000:00000000 00:00000000 00000000     0        0 2 1
   2: 0B00007F:2400 0C00007F:D4A4 06 00000000:00000000 03:00000000 00000000     0        0 0 3
   3: 0C00007F:D4A2 0B00007F:2400 01 00000000:00000000 00:00000000 00000000     0        0 3 1
   4: 0B00007F:2401 0C00007F:D4A6 01 00000000:00000000 00:00000000 00000000     0        0 4 1
""".splitlines()


def test_counts_only_established_connections_on_the_port() -> None:
    # 0x2400 = 9216: one listener (0A), one established (01), one TIME_WAIT (06) on it;
    # the client side of the established one has 9216 as its *remote* port.
    assert established_on(9216, SAMPLE[1:]) == 1
    assert established_on(9217, SAMPLE[1:]) == 1
    assert established_on(80, SAMPLE[1:]) == 0


def test_real_sockets() -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    try:
        assert connections(os.getpid(), port) == 0
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        accepted = [srv.accept()[0] for _ in clients]
        assert connections(os.getpid(), port) == 3
        for s in clients + accepted:
            s.close()
        assert connections(os.getpid(), port) == 0
    finally:
        srv.close()


def test_gone_process_has_no_connections() -> None:
    assert connections(2**22 + 12345, 80) == 0
