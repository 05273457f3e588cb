"""The two-host helper itself (tests/netns.py): the link carries traffic between the namespaces, its
byte counters see it, the optional rate limit holds, and nothing is left behind."""

import subprocess
import sys
import time

import pytest
from netns import namespace_problem, two_hosts

RECEIVE = """
import socket, sys
server = socket.create_server((sys.argv[1], 5001))
print("listening", flush=True)
conn, _ = server.accept()
total = 0
while chunk := conn.recv(1 << 20):
    total += len(chunk)
print(total, flush=True)
"""
SEND = """
import socket, sys, time
data = bytes(1 << 20)
with socket.create_connection((sys.argv[1], 5001)) as conn:
    start = time.monotonic()
    for _ in range(int(sys.argv[2])):
        conn.sendall(data)
print(time.monotonic() - start)
"""


@pytest.mark.commands
def test_rate_limited_link(tmp_path):
    """4 MiB at 20 Mbit/s takes at least 1.6 s (unlimited, a veth moves it in milliseconds)."""
    problem = namespace_problem()
    if problem:
        pytest.skip(problem)
    with two_hosts(tmp_path, ssh=False, rate_mbit=20) as net:
        sender, receiver = net.hosts
        before = net.link_bytes()
        server = receiver.popen([sys.executable, "-c", RECEIVE, receiver.address], stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline() == "listening\n"
        start = time.monotonic()
        sender.run([sys.executable, "-c", SEND, receiver.address, "4"], timeout=60)
        received = int(server.stdout.readline())
        elapsed = time.monotonic() - start
        server.wait(timeout=10)
        print(f"4 MiB over a 20 Mbit/s link in {elapsed:.2f} s")
        assert received == 4 << 20
        assert elapsed >= 4 * 8 * 1.048576 / 20 * 0.95  # tbf lets one 16 KiB burst through early
        assert net.link_bytes() - before >= 4 << 20
        namespaces = [h.namespace for h in net.hosts]
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in namespaces)
