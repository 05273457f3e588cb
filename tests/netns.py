"""Two "hosts" on one machine: network namespaces joined by a veth pair, each running a private sshd.

    with two_hosts(tmp_path, rate_mbit=100) as net:
        net.hosts[0].popen([...])          # a process on host 0 (inside its namespace)
        net.ssh_options                    # what ssh/pdsh need to log in to either host
        net.link_bytes()                   # bytes that crossed the link so far

Both ends of the veth pair carry the same interface name (`net.interface`) inside their namespaces,
as every node of a real cluster names its data interface alike: one GLOO_SOCKET_IFNAME then fits
every node. Names are unique per use so that concurrent users cannot clash; addresses need not be,
since each pair of namespaces is a network of its own. Everything is torn down on exit, processes
still running inside the namespaces included. Needs root (creating namespaces) and, for ssh,
Debian's openssh-server.
"""

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

SSHD = "/usr/sbin/sshd"  # sshd refuses to run unless started by its absolute path
SUBNET = "10.213.0"


@dataclass(frozen=True)
class Host:
    """One namespace: its name, its address on the link, and how to run commands inside it."""

    namespace: str
    address: str

    def command(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *argv]

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), check=True, capture_output=True, text=True, **kwargs)

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(argv), **kwargs)

    def pids(self) -> list[int]:
        """Every process inside this namespace (sshd, and whatever it or `popen` started)."""
        out = subprocess.run(["ip", "netns", "pids", self.namespace], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]


@dataclass(frozen=True)
class TwoHosts:
    hosts: tuple[Host, Host]
    interface: str  # the veth end's name inside each namespace
    ssh_port: int | None  # sshd's port on both hosts (None without ssh)
    ssh_options: str  # ssh options to log in as this user with the generated key (PDSH_SSH_ARGS_APPEND)
    sshd_pids: tuple[int, ...]

    def link_bytes(self) -> int:
        """Bytes sent plus received on host 0's end of the link since it was created."""
        out = subprocess.run(["ip", "-n", self.hosts[0].namespace, "-s", "-j", "link", "show", "dev", self.interface],
                             check=True, capture_output=True, text=True).stdout
        stats = json.loads(out)[0]["stats64"]
        return stats["rx"]["bytes"] + stats["tx"]["bytes"]

    def kill_host_processes(self, host: Host, sig: int = signal.SIGKILL) -> list[int]:
        """Kill what runs on `host` except its sshd (a crashed node's jobs, with the node still up)."""
        victims = [p for p in host.pids() if p not in self.sshd_pids]
        for pid in victims:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return victims


def namespace_problem() -> str | None:
    """Why network namespaces cannot be created here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (run the tests as root, as CI does)"
    if shutil.which("ip") is None:
        return "`ip` (Debian's iproute2) is not installed"
    probe = f"btprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def missing_tools(tools: tuple[str, ...] = ("sshd", "ssh", "ssh-keygen")) -> str | None:
    """Which of the programs two hosts with ssh need are not installed, or None."""
    missing = [t for t in tools if not (os.path.exists(SSHD) if t == "sshd" else shutil.which(t))]
    if missing:
        return (f"{', '.join(missing)} not installed (Debian: openssh-server, openssh-client, pdsh); "
                "`make setup` as root installs them")
    return None


@contextmanager
def two_hosts(work_dir: Path, ssh: bool = True, rate_mbit: float | None = None) -> Iterator[TwoHosts]:
    """Two namespaces on one veth link, 10.213.0.1 and 10.213.0.2, with sshd on both (if `ssh`)
    accepting a key generated here, and the link optionally limited to `rate_mbit` each way."""
    tag = uuid.uuid4().hex[:6]
    interface = f"bt{tag}"
    hosts = (Host(f"bt{tag}a", f"{SUBNET}.1"), Host(f"bt{tag}b", f"{SUBNET}.2"))
    with ExitStack() as cleanup:
        for host in hosts:
            _ip("netns", "add", host.namespace)
            cleanup.callback(_remove_namespace, host)
        # Created in the root namespace under two temporary names, then moved and given one name.
        _ip("link", "add", f"{interface}a", "type", "veth", "peer", "name", f"{interface}b")
        for host, end in zip(hosts, "ab"):
            _ip("link", "set", f"{interface}{end}", "netns", host.namespace)
            _ip("-n", host.namespace, "link", "set", f"{interface}{end}", "name", interface)
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", interface)
            _ip("-n", host.namespace, "link", "set", interface, "up")
            _ip("-n", host.namespace, "link", "set", "lo", "up")
            if rate_mbit is not None:
                limit_rate(host, interface, rate_mbit)
        port, options, pids = None, "", ()
        if ssh:
            port, options, pids = _start_sshd(work_dir / f"ssh-{tag}", hosts)
        yield TwoHosts(hosts, interface, port, options, pids)


def limit_rate(host: Host, interface: str, rate_mbit: float) -> None:
    """Cap what `host` sends on the link with a token bucket (tbf: netem, which could also add delay,
    is missing from some kernels, this machine's included). The bucket holds 10 ms of traffic, at
    least 16 KiB, so that the cap is kept without stalls."""
    burst = max(16384, int(rate_mbit * 1e6 / 8 / 100))
    host.run(["tc", "qdisc", "replace", "dev", interface, "root", "tbf",
              "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "100ms"])


def _start_sshd(ssh_dir: Path, hosts: tuple[Host, ...]) -> tuple[int, str, tuple[int, ...]]:
    ssh_dir.mkdir(parents=True)
    ssh_dir.chmod(0o700)
    for key in ("host_key", "id_ed25519"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bigtrain-test", "-f",
                        str(ssh_dir / key)], check=True)
    (ssh_dir / "authorized_keys").write_text((ssh_dir / "id_ed25519.pub").read_text())
    port = 2222
    host_key = (ssh_dir / "host_key.pub").read_text().split()[:2]
    (ssh_dir / "known_hosts").write_text(
        "".join(f"[{h.address}]:{port} {' '.join(host_key)}\n" for h in hosts)
    )
    # Privilege separation needs this directory; Debian's service script creates it, we start sshd
    # directly.
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    pids = []
    for host in hosts:
        config = ssh_dir / f"sshd_config_{host.namespace}"
        pid_file = ssh_dir / f"sshd_{host.namespace}.pid"
        config.write_text(
            f"Port {port}\nListenAddress {host.address}\nHostKey {ssh_dir / 'host_key'}\n"
            f"PidFile {pid_file}\nAuthorizedKeysFile {ssh_dir / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nLogLevel ERROR\n"
        )
        # Without -D sshd returns once it listens, so the hosts are reachable when this returns.
        host.run([SSHD, "-f", str(config)])
        deadline = time.monotonic() + 10
        while not pid_file.exists() or not pid_file.read_text().strip():
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd in {host.namespace} wrote no pid file")
            time.sleep(0.05)
        pids.append(int(pid_file.read_text()))
    options = (f"-i {ssh_dir / 'id_ed25519'} -o IdentitiesOnly=yes -o BatchMode=yes "
               f"-o UserKnownHostsFile={ssh_dir / 'known_hosts'} -o StrictHostKeyChecking=yes")
    return port, options, tuple(pids)


def _remove_namespace(host: Host) -> None:
    """Kill every process still inside the namespace, then delete it (a namespace with processes
    in it would outlive its name)."""
    for _ in range(50):
        pids = host.pids()
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True)


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
