"""Check a multi-node launch before any rank starts: the hostfile, its slots against the config, ssh.

A hostfile lists one node per line as `HOSTNAME slots=N` (N processes on that node, e.g. its GPUs),
the format of DeepSpeed's launcher; `#` starts a comment. Every problem is a ConfigError with one
paragraph naming the bad line or host and what to change, raised before DeepSpeed is imported.
"""

import os
import re
import shlex
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from bigtrain.config import compose
from bigtrain.config.validate import validate
from bigtrain.distributed.process_group import set_network_defaults
from bigtrain.errors import ConfigError

# Host names go to pdsh and ssh unquoted, and into the shell command line pdsh runs on every node:
# only DNS-style names and IPv4 addresses pass, so no shell metacharacter, pdsh host-list syntax
# (`[`, `,`, `@`) or option (leading `-`) can get through.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
SLOTS = re.compile(r"slots=(\d+)")
IPV4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
MAX_SLOTS = 1024
# Prints "NAME ADDRESS": the host's name and the address gloo would listen on without
# GLOO_SOCKET_IFNAME, found as torch finds it (the first address the name resolves to that a socket
# can bind; none: gloo falls back to loopback). Runs on every host, so only the standard library.
GLOO_ADDRESS_PROBE = """
import socket
name, usable = socket.gethostname(), ""
try:
    found = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
except OSError:
    found = []
for family, _, _, _, address in found:
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((address[0], 0))
        usable = address[0]
        break
    except OSError:
        pass
print(name, usable)
"""
FORMAT_HINT = "one node per line, `HOSTNAME slots=N`, e.g. `node-01 slots=8`; `#` starts a comment"


@dataclass(frozen=True)
class HostEntry:
    name: str
    slots: int
    line: int  # 1-based line number in the hostfile


def read_hostfile(path: str | Path) -> list[HostEntry]:
    """Parse and check the hostfile at `path`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"Hostfile {str(path)!r} does not exist. Pass the right path, or write one with {FORMAT_HINT}."
        )
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"Hostfile {str(path)!r} cannot be read as text ({type(err).__name__}): it is not a hostfile. "
            f"Write {FORMAT_HINT}."
        ) from None
    return parse_hostfile(text, str(path))


def parse_hostfile(text: str, source: str = "hostfile") -> list[HostEntry]:
    """Hosts in file order; refuses bad lines, bad host names, zero slots, duplicates and no hosts."""
    hosts: dict[str, HostEntry] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        fields = raw.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"Hostfile {source}, line {number}"
        slots = SLOTS.fullmatch(fields[1]) if len(fields) == 2 else None
        if slots is None:
            raise ConfigError(
                f"{where}: {raw.strip()!r} is not `HOSTNAME slots=N`. Write {FORMAT_HINT}."
            )
        name = fields[0]
        check_host_name(name, where)
        count = int(slots.group(1))
        if count > MAX_SLOTS:
            raise ConfigError(
                f"{where}: host {name} has slots={count}, more processes than any node runs (at most "
                f"{MAX_SLOTS}): a typo? Give the node's number of GPUs, or of CPU ranks."
            )
        if count == 0:
            raise ConfigError(
                f"{where}: host {name} has slots=0, which would start no process there. Give it "
                "slots=N with N >= 1 (the number of processes for that node, e.g. its GPU count), "
                "or remove the line."
            )
        if name.lower() in hosts:
            raise _listed_twice(source, hosts[name.lower()], name, number, "host names do not depend on case")
        hosts[name.lower()] = HostEntry(name, count, number)
    if not hosts:
        raise ConfigError(f"Hostfile {source} lists no hosts. Write {FORMAT_HINT}.")
    _check_addresses(list(hosts.values()), source)
    return list(hosts.values())


def _listed_twice(source: str, first: HostEntry, name: str, number: int, why: str = "") -> ConfigError:
    if name == first.name:
        seen = f"host {name} is listed twice (lines {first.line} and {number})"
    else:
        seen = f"hosts {first.name} (line {first.line}) and {name} (line {number}) are the same node ({why})"
    return ConfigError(
        f"Hostfile {source}: {seen}; DeepSpeed refuses duplicate hosts. List every node once, with all of its "
        "processes in one slots=N."
    )


def _check_addresses(hosts: list[HostEntry], source: str) -> None:
    """A node listed once by name and once by its own address is one node. Names are resolved only when
    the hostfile has addresses in it, so a hostfile of names costs no lookups."""
    literal = {h.name: h for h in hosts if IPV4.fullmatch(h.name)}
    if not literal:
        return
    for host in hosts:
        if host.name in literal:
            continue
        try:
            addresses = {info[4][0] for info in socket.getaddrinfo(host.name, None, socket.AF_INET)}
        except OSError:
            continue  # not resolvable here: the ssh check reports it
        for address in sorted(addresses & literal.keys()):
            first, second = sorted((host, literal[address]), key=lambda h: h.line)
            raise _listed_twice(source, first, second.name, second.line, f"{host.name} resolves to {address}")


def check_host_name(name: str, where: str) -> None:
    """Refuse a host name or address that pdsh and ssh should not be handed."""
    if len(name) > 253 or not HOSTNAME.fullmatch(name):
        raise ConfigError(
            f"{where}: {name!r} is not a valid host name. Host names reach pdsh, ssh and a remote "
            "shell as they are, so only letters, digits, '-', '_' and '.' are accepted (no spaces, "
            "quotes, ; | & $ ` [ ] , @ or a leading '-'; no IPv6 literals). Use the node's DNS name, "
            "an alias from ~/.ssh/config, or its IPv4 address."
        )


def world_size(hosts: list[HostEntry]) -> int:
    return sum(h.slots for h in hosts)


def check_layout(hosts: list[HostEntry], overrides: list[str], source: str = "hostfile",
                 this_node: int = 0) -> DictConfig:
    """The config must work with as many processes as the hostfile has slots (parallel layout and
    batch arithmetic, through the same validation every rank runs at start-up); this machine, line
    `this_node` of the hostfile, must have a GPU for each of its slots on a GPU run."""
    cfg = compose(overrides)  # a bad override is reported as is: it has nothing to do with the hosts
    size = world_size(hosts)
    try:
        validate(cfg, size, local_ranks=hosts[this_node].slots)
    except ConfigError as err:
        slots = " + ".join(f"{h.name} {h.slots}" for h in hosts)
        raise ConfigError(
            f"Hostfile {source} gives {size} slots ({slots}), so the job would have {size} "
            f"processes, and the config does not fit that: {err} Change the slots in the hostfile "
            "or the config."
        ) from None
    return cfg


def check_node_rank(hosts: list[HostEntry], node_rank: int, source: str = "hostfile") -> None:
    """A per-node launch's rank must name one of the hostfile's lines (0 is the first host)."""
    if not 0 <= node_rank < len(hosts):
        raise ConfigError(
            f"Node rank {node_rank} does not fit hostfile {source}, which lists {len(hosts)} hosts: "
            f"give each node its position in the hostfile, 0 to {len(hosts) - 1} (0 is "
            f"{hosts[0].name}, the node where the ranks meet)."
        )


def check_ssh(hosts: list[HostEntry], port: int | None = None, options: str = "", timeout_s: float = 5,
              source: str = "hostfile") -> dict[str, str]:
    """Log in to every host at once, as pdsh will (key-based, no prompts), each within `timeout_s`,
    and check that this Python and working directory exist there: DeepSpeed starts the ranks on
    every node as `cd $PWD; $PYTHON -m deepspeed.launcher.launch ...` with this machine's paths.
    Returns each host's GLOO_ADDRESS_PROBE answer (see check_gloo_address)."""
    python, cwd = sys.executable, str(Path.cwd())
    remote = (f"test -x {shlex.quote(python)} || exit 3; test -d {shlex.quote(cwd)} || exit 4; "
              f"{shlex.quote(python)} -c {shlex.quote(GLOO_ADDRESS_PROBE)}")
    resolved: dict[str, str] = {}
    try:
        extra = shlex.split(options)
    except ValueError as err:
        raise ConfigError(
            f"PDSH_SSH_ARGS_APPEND={options!r} cannot be split into ssh options ({err}): pdsh would fail the same "
            "way on every host. Fix its quoting, e.g. PDSH_SSH_ARGS_APPEND='-i ~/.ssh/key -o StrictHostKeyChecking=no'."
        ) from None

    def probe(host: HostEntry) -> str | None:
        # ssh keeps the first value it is given for an option: ours bound the probe's time and
        # forbid prompts whatever the user's options say.
        command = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, round(timeout_s))}",
                   *extra, *(["-p", str(port)] if port else []), host.name, remote]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s + 5,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return f"{host.name}: no answer within {timeout_s:g} s"
        if done.returncode == 0:
            lines = done.stdout.strip().splitlines()  # a login script may print before our line
            resolved[host.name] = lines[-1] if lines else ""
            return None
        if done.returncode == 3:
            return f"{host.name}: has no {python}"
        if done.returncode == 4:
            return f"{host.name}: has no folder {cwd}"
        detail = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"ssh exit code {done.returncode}"
        return f"{host.name}: {detail}"

    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        problems = [p for p in pool.map(probe, hosts) if p]
    if problems:
        on_port = f" on port {port}" if port else ""
        raise ConfigError(
            f"{len(problems)} of the {len(hosts)} hosts in {source} cannot run this job over ssh"
            f"{on_port} ({'; '.join(problems)}). Every host must accept key-based ssh from this "
            "machine without a prompt (the key in its authorized_keys, its host key in known_hosts, "
            "e.g. through ssh-keyscan), be up and resolvable, and have bigtrain's environment and "
            "working directory at the same paths as here (a shared filesystem); pass extra ssh "
            "options in PDSH_SSH_ARGS_APPEND and the port in SSH_PORT."
        )
    return resolved


def check_gloo_address(host: str, probe_answer: str) -> None:
    """Without GLOO_SOCKET_IFNAME, gloo (the collectives of CPU ranks) listens on the first address
    its node's host name resolves to that it can bind, and on loopback when there is none; the
    other nodes cannot reach either loopback case, and the job would hang at its first collective.
    `probe_answer` is GLOO_ADDRESS_PROBE's output on `host`: "NAME ADDRESS", ADDRESS empty if none."""
    name, _, address = probe_answer.partition(" ")
    address = address.strip()
    if address and not (address.startswith("127.") or address == "::1"):
        return
    seen = (f"resolves its own name {name!r} to {address}, a loopback address" if address
            else f"resolves its own name {name!r} to no address it has")
    raise ConfigError(
        f"Host {host} {seen}, so gloo, which carries the collectives of CPU ranks and bigtrain's own side "
        "group on GPUs, would listen on "
        "loopback where the other nodes cannot reach it, and the job would hang at its first "
        "collective. Set GLOO_SOCKET_IFNAME to the network interface the nodes share (the same name "
        "on every node, e.g. GLOO_SOCKET_IFNAME=eth0; `ip -br addr` lists them), or make each "
        "node's name resolve to its address on that network."
    )


def local_gloo_address() -> str:
    """GLOO_ADDRESS_PROBE's answer on this machine."""
    return subprocess.run([sys.executable, "-c", GLOO_ADDRESS_PROBE], capture_output=True, text=True,
                          check=True).stdout.strip()


def check_launch(hostfile: str | Path, overrides: list[str], *, ssh: bool = True, ssh_port: int | None = None,
                 ssh_options: str = "", ssh_timeout_s: float = 5, node_rank: int | None = None,
                 master_addr: str | None = None) -> list[HostEntry]:
    """Every check a multi-node launch needs, cheapest first; returns the hosts.

    `ssh=False` is a per-node launch (this node is `node_rank`): no ssh, and the gloo address
    check covers this node only."""
    hosts = read_hostfile(hostfile)
    if master_addr:
        check_host_name(master_addr, "The master address")
    if node_rank is not None:
        check_node_rank(hosts, node_rank, str(hostfile))
    check_layout(hosts, overrides, str(hostfile), this_node=node_rank or 0)
    resolved = check_ssh(hosts, ssh_port, ssh_options, ssh_timeout_s, str(hostfile)) if ssh else {}
    env = dict(os.environ)
    set_network_defaults(env)  # as every rank will see it
    # gloo carries CPU ranks' collectives, and GPU jobs' own side group (long waits, checkpoint decisions).
    if len(hosts) > 1 and not env.get("GLOO_SOCKET_IFNAME"):
        if ssh:
            for host in hosts:
                check_gloo_address(host.name, resolved[host.name])
        else:
            check_gloo_address(hosts[node_rank or 0].name, local_gloo_address())
    return hosts
