"""The multi-node launch check (`bigtrain hosts`, bigtrain/hosts.py): every bad hostfile, layout and
unreachable host is refused with one paragraph naming it, before DeepSpeed is imported."""

import socket
import subprocess
import sys
import textwrap
import time

import pytest

from bigtrain.errors import ConfigError
from bigtrain.tools.hosts import check_gloo_address, check_launch, check_ssh, parse_hostfile, read_hostfile

# name: (hostfile text, words the message must contain)
BAD_HOSTFILES = {
    "no_slots": ("node-01 slots=2\nnode-02\n", "line 2: 'node-02' is not `HOSTNAME slots=N`"),
    "slots_not_a_number": ("node-01 slots=two\n", "line 1: 'node-01 slots=two' is not `HOSTNAME slots=N`"),
    "mpi_style_extra_field": ("node-01 slots=2 max_slots=4\n", "line 1: 'node-01 slots=2 max_slots=4' is not"),
    "zero_slots": ("node-01 slots=2\nnode-02 slots=0\n", "line 2: host node-02 has slots=0"),
    "duplicate_host": ("node-01 slots=2\n# spare\nnode-02 slots=2\nnode-01 slots=2\n",
                       "host node-01 is listed twice (lines 1 and 4)"),
    "shell_metacharacters": ("node-01 slots=1\nnode-02;rm${IFS}-rf slots=1\n",
                             "line 2: 'node-02;rm${IFS}-rf' is not a valid host name"),
    "command_substitution": ("$(reboot) slots=1\n", "line 1: '$(reboot)' is not a valid host name"),
    "pdsh_host_range": ("node[01-04] slots=1\n", "line 1: 'node[01-04]' is not a valid host name"),
    "leading_dash_option": ("-oProxyCommand=x slots=1\n", "'-oProxyCommand=x' is not a valid host name"),
    "ipv6_literal": ("fe80::1 slots=1\n", "'fe80::1' is not a valid host name"),
    "only_comments": ("# node-01 slots=8\n\n", "lists no hosts"),
    "same_host_other_case": ("node-01 slots=1\nNODE-01 slots=1\n",
                             "hosts node-01 (line 1) and NODE-01 (line 2) are the same node (host names do not "
                             "depend on case)"),
    "a_name_and_its_address": ("127.0.0.1 slots=1\nlocalhost slots=1\n",
                               "hosts 127.0.0.1 (line 1) and localhost (line 2) are the same node (localhost "
                               "resolves to 127.0.0.1)"),
    "absurd_slots": ("node-01 slots=4096\n", "line 1: host node-01 has slots=4096, more processes than any node"),
}


@pytest.mark.parametrize("name", BAD_HOSTFILES)
def test_bad_hostfile_is_refused_with_its_line(tmp_path, name):
    text, words = BAD_HOSTFILES[name]
    path = tmp_path / "hostfile"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        read_hostfile(path)
    message = str(err.value)
    assert words in message, message
    assert str(path) in message and "\n" not in message


def test_a_binary_hostfile_is_refused(tmp_path):
    path = tmp_path / "hostfile"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match="cannot be read as text .* it is not a hostfile"):
        read_hostfile(path)


def test_good_hostfile_keeps_order_comments_and_slots():
    hosts = parse_hostfile("# cluster\nnode-02 slots=8  # the master\n\n10.0.0.7   slots=4\ngpu_a.lab.org slots=1\n")
    assert [(h.name, h.slots, h.line) for h in hosts] == [("node-02", 8, 2), ("10.0.0.7", 4, 4), ("gpu_a.lab.org", 1, 5)]


def test_missing_hostfile(tmp_path):
    with pytest.raises(ConfigError, match=r"Hostfile '.*/nope' does not exist\. Pass the right path, or write one with one node per line"):
        read_hostfile(tmp_path / "nope")


# (hostfile, overrides, extra keyword arguments, words the message must contain)
BAD_LAUNCHES = {
    "batch_arithmetic_against_slots": (
        "a slots=2\nb slots=1\n", ["train.global_batch_size=16", "train.micro_batch_size=4"], {},
        "Hostfile {path} gives 3 slots (a 2 + b 1), so the job would have 3 processes, and the config "
        "does not fit that: train.global_batch_size=16 cannot hold with 3 data-parallel ranks",
    ),
    "parallel_layout_against_slots": (
        "a slots=1\nb slots=2\n", ["parallel.tensor=2"], {}, "gives 3 slots (a 1 + b 2)",
    ),
    "bad_override_is_reported_as_is": (
        "a slots=1\n", ["zero=stage9"], {}, "Unknown zero option 'stage9'",
    ),
    "node_rank_out_of_range": (
        "a slots=1\nb slots=1\n", [], {"ssh": False, "node_rank": 2},
        "Node rank 2 does not fit hostfile {path}, which lists 2 hosts: give each node its position",
    ),
    "master_address_with_shell_characters": (
        "a slots=1\n", [], {"ssh": False, "master_addr": "a;reboot"},
        "The master address: 'a;reboot' is not a valid host name",
    ),
}


@pytest.mark.parametrize("name", BAD_LAUNCHES)
def test_bad_launch_is_refused(tmp_path, name):
    text, overrides, kwargs, words = BAD_LAUNCHES[name]
    path = tmp_path / "hostfile"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        check_launch(path, overrides, **{"ssh": False, **kwargs})
    assert words.format(path=path) in str(err.value), str(err.value)


@pytest.mark.commands
def test_unreachable_hosts_are_named_and_the_probe_is_bounded():
    """A host that accepts TCP but never speaks ssh (a hung node) is named, and the check returns
    within its timeout (1 s) plus ssh's start-up, not after the kernel's TCP timeout; a host that
    refuses the connection is named with ssh's reason."""
    with socket.socket() as silent, socket.socket() as closed:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # completes the TCP handshake, then says nothing
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        start = time.monotonic()
        with pytest.raises(ConfigError) as hung:
            check_ssh(parse_hostfile("127.0.0.1 slots=1\n"), port=silent.getsockname()[1], timeout_s=1)
        elapsed = time.monotonic() - start
        with pytest.raises(ConfigError) as refused:
            check_ssh(parse_hostfile("localhost slots=1\n"), port=closed.getsockname()[1], timeout_s=1)
    print(f"silent host refused after {elapsed:.1f} s")
    assert elapsed < 8
    message = str(hung.value)
    assert message.startswith("1 of the 1 hosts in hostfile cannot run this job over ssh on port")
    assert "(127.0.0.1: " in message and "timed out" in message, message
    assert "Every host must accept key-based ssh" in message
    assert "(localhost: " in str(refused.value) and "Connection refused" in str(refused.value), str(refused.value)


def test_loopback_resolution_without_gloo_interface_is_refused():
    with pytest.raises(ConfigError, match=r"Host node-02 resolves its own name 'vm' to 127\.0\.0\.1, a "
                                          r"loopback address.*Set GLOO_SOCKET_IFNAME"):
        check_gloo_address("node-02", "vm 127.0.0.1")
    with pytest.raises(ConfigError, match="Host node-02 resolves its own name 'vm' to no address it has"):
        check_gloo_address("node-02", "vm ")
    check_gloo_address("node-02", "node-02 10.1.2.3")  # a routable address is fine


@pytest.mark.commands
def test_cli_exit_codes_and_no_deepspeed_import(tmp_path):
    """`bigtrain hosts` exits 2 with the one-paragraph message on stderr, 0 with a summary, and a
    failed check imports no DeepSpeed (nothing heavy starts)."""
    bad = tmp_path / "bad"
    bad.write_text("node-01 slots=1\nnode-01 slots=1\n")
    good = tmp_path / "good"
    good.write_text("node-01 slots=2\n")
    probe = textwrap.dedent("""
        import contextlib, io, json, sys
        from bigtrain.cli import main
        out = {}
        for name, args in (("bad", ["hosts", "--no-ssh", sys.argv[1]]), ("good", ["hosts", "--no-ssh", sys.argv[2], "zero=stage1"])):
            err, std = io.StringIO(), io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
                rc = main(args)
            out[name] = {"rc": rc, "stderr": err.getvalue(), "stdout": std.getvalue()}
        out["deepspeed_imported"] = "deepspeed" in sys.modules
        print(json.dumps(out))
    """)
    import json

    result = json.loads(subprocess.run([sys.executable, "-c", probe, str(bad), str(good)], check=True,
                                       capture_output=True, text=True).stdout)
    assert result["bad"]["rc"] == 2
    assert result["bad"]["stderr"] == (
        f"bigtrain: launch check failed: Hostfile {bad}: host node-01 is listed twice (lines 1 and 2); "
        "DeepSpeed refuses duplicate hosts. List every node once, with all of its processes in one slots=N.\n"
    )
    assert result["good"] == {"rc": 0, "stderr": "", "stdout": "1 hosts, 2 processes (node-01 x2)\n"}
    assert result["deepspeed_imported"] is False
