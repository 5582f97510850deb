"""Loopback ports for servers started later: the bundled Kafka broker of `orchestrator dev`, and
the servers the tests and the fault-injection run start."""
from __future__ import annotations

import random
import socket


def free_port() -> int:
    """A 127.0.0.1 TCP port nothing listens on now, picked at random below the kernel's ephemeral
    range (`/proc/sys/net/ipv4/ip_local_port_range`, else 32768). A port from bind(0) lies in that
    range, where any outgoing connection (to PostgreSQL, RabbitMQ, ...) may take it before the
    server binds it; random, so that two callers at once rarely try the same one."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    while True:
        port = random.randint(max(1024, ephemeral - 12000), ephemeral - 1)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
