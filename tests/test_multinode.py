"""Two nodes on one machine (tests/netns.py: two network namespaces on a veth link, sshd in each).

The hostfile launch (launchers/multinode.sh: deepspeed -> pdsh -> ssh) reaches both nodes and
trains across the link; a SIGTERM to it stops the ranks on every node with a checkpoint, and under
launchers/restart.sh it survives one node's processes being killed: the job ends, is relaunched
and resumes from the last checkpoint. The per-node launch (launchers/node.sh, no ssh) trains the
same way. The launch check refuses to start where gloo would listen on loopback.

Tolerance: each step's loss is within 1e-4 of the single-process reference (tests/reference.py),
the parity tolerance of tests/test_parity.py, for the same reason: two ranks on two namespaces
run the same arithmetic as two ranks on one (the same gloo all-reduce, now over TCP on the veth
instead of loopback), so the only difference from the reference is the order of floating-point
sums, a few 1e-6 after ten Adam steps.

Proof that the gradients crossed the link: the bytes counted on the veth interface. Whatever the
collective, two data-parallel ranks must each send the other at least half of the N fp32 gradients
every step, so at least 4 x N bytes pass host 0's end of the link per step (sent plus received);
the test asks for that (measured: about 12 x N, as ZeRO-2 all-reduces the gradients and gathers
the updated parameters). Neither ssh nor the launchers' traffic (kilobytes) can make it up, and
ranks talking over loopback would not produce it at all.
"""

import re
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST, REPO, TINY_LLAMA, read_metrics, wait_for_step
from netns import missing_tools, namespace_problem, two_hosts
from reference import reference_losses

from bigtrain.components.models import build_model
from bigtrain.config import compose

TOLERANCE = 1e-4
STEPS = 10
LAUNCHERS = REPO / "launchers"
VENV = str(Path(sys.executable).parent.parent)  # the launchers use the environment running the tests
# A dead node must end the job within this (seen: a few seconds, as the surviving rank's next
# collective fails at once with "Connection closed by peer"); generous for a loaded 2-core machine.
END_BOUND_S = 60
# tiny_llama: the preemption test signals the job at step 3 and needs it still training when the signal
# has crossed ssh to both nodes, which the debug model's steps are too quick for.
RUN = [*FAST, *TINY_LLAMA]


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    problem = namespace_problem()
    if problem:
        pytest.skip(problem)
    missing = missing_tools(("sshd", "ssh", "ssh-keygen", "pdsh"))
    if missing:  # root here (namespaces work): the setup should have installed them
        pytest.fail(missing)
    with two_hosts(tmp_path_factory.mktemp("net")) as hosts:
        yield hosts


@pytest.fixture(scope="module")
def expected():
    cfg = compose(RUN)
    trainable = sum(p.numel() for p in build_model(cfg.model, cfg.seed).parameters())
    return {"losses": reference_losses(cfg, dp_size=2, steps=STEPS), "min_link_bytes": STEPS * trainable * 4}


@pytest.fixture
def hostfile(net, tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("".join(f"{h.address} slots=1\n" for h in net.hosts))
    return path


@pytest.fixture
def launch_env(net):
    """What a user on these nodes sets: the interface the nodes share, the sshd port and key, and one
    thread per rank (two ranks share this machine's two cores)."""
    return {"GLOO_SOCKET_IFNAME": net.interface, "SSH_PORT": str(net.ssh_port),
            "PDSH_SSH_ARGS_APPEND": net.ssh_options, "OMP_NUM_THREADS": "1", "VENV": VENV}


@pytest.fixture(autouse=True)
def nothing_left_running(request):
    """Whatever a test started on the hosts ends with it (the namespaces outlive single tests)."""
    yield
    if "net" in request.fixturenames:
        hosts = request.getfixturevalue("net")
        for host in hosts.hosts:
            hosts.kill_host_processes(host)


def check_losses(run_dir, expected):
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    got = [m["loss"] for m in metrics]
    worst = max(abs(a - b) for a, b in zip(got, expected["losses"]))
    print(f"worst |loss - reference| over {STEPS} steps: {worst:.2e}")
    assert worst <= TOLERANCE, f"losses {got}\nreference {expected['losses']}"


@pytest.mark.multiprocess
def test_launch_check_refuses_loopback_gloo(net, hostfile, launch_env, tmp_path, background):
    """Without GLOO_SOCKET_IFNAME, `bigtrain hosts` on node 0 logs in to both nodes and refuses:
    each node's own name resolves to no address the other node can reach, so gloo would fall back
    to loopback and the job would hang (seen before the check existed). The passing check is part
    of every multinode.sh launch below."""
    env = {k: v for k, v in launch_env.items() if k != "GLOO_SOCKET_IFNAME"}
    command = net.hosts[0].command([sys.executable, "-m", "bigtrain.cli", "hosts", "--ssh-port", str(net.ssh_port),
                                    str(hostfile)])
    refused = background(command, tmp_path, tmp_path / "refused.txt", **env)
    assert refused.wait(timeout=60) == 2
    message = (tmp_path / "refused.txt").read_text()
    assert re.fullmatch(rf"bigtrain: launch check failed: Host {net.hosts[0].address} resolves its own name "
                        r"'[^']+' to .*Set GLOO_SOCKET_IFNAME to the network interface the nodes share.*\n",
                        message), message


@pytest.mark.multiprocess
def test_hostfile_launch_over_ssh_preempted_then_a_dead_node(net, hostfile, launch_env, expected, tmp_path,
                                                              background):
    """launchers/multinode.sh on node 0, in three legs over one run dir (checkpoints every 2 steps):
    1. SIGTERM to multinode.sh at step 3 or just after: the ranks on both nodes save and the job
       exits 75 (preempted).
    2. launchers/restart.sh around multinode.sh resumes there; two steps later every process of the
       job on node 1 is killed (its sshd stays, as a rebooted node's would come back): the job ends
       within END_BOUND_S with a nonzero code and the wrapper relaunches it,
    3. which resumes from the last checkpoint and finishes.
    All ten losses match the reference, and the gradients crossed the veth link."""
    node0, node1 = net.hosts
    run_dir = tmp_path / "run"
    overrides = [*RUN, "checkpoint.interval=2", f"run_dir={run_dir}"]
    start_bytes = net.link_bytes()

    launch = background(node0.command([str(LAUNCHERS / "multinode.sh"), str(hostfile), *overrides]),
                        tmp_path, tmp_path / "leg1.txt", **launch_env)
    wait_for_step(run_dir, 3, launch)
    launch.send_signal(signal.SIGTERM)  # `ip netns exec` execs the script: this is multinode.sh
    assert launch.wait(timeout=120) == 75, (tmp_path / "leg1.txt").read_text()[-4000:]
    leg1 = (tmp_path / "leg1.txt").read_text()
    assert leg1.startswith(f"2 hosts, 2 processes ({node0.address} x1, {node1.address} x1), all reachable over ssh\n")
    # pdsh started a launcher on each node over ssh, and both nodes' output came back through it.
    assert f"Running on the following workers: {node0.address},{node1.address}" in leg1
    assert f"{node1.address}: " in leg1 and "node_rank=1" in leg1
    stopped_at = read_metrics(run_dir)[-1]["step"]
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stopped_at:08d}"
    for node in (node0, node1):  # every node's ranks were told, not just one
        assert re.search(rf"{re.escape(node.address)}: .*received SIGTERM", leg1), leg1[-4000:]

    log_path = tmp_path / "legs2-3.txt"
    wrapper = background(
        node0.command([str(LAUNCHERS / "restart.sh"), str(LAUNCHERS / "multinode.sh"), str(hostfile), *overrides]),
        tmp_path, log_path, MAX_RESTARTS="1", RESTART_DELAY_S="0", **launch_env,
    )
    wait_for_step(run_dir, stopped_at + 2, wrapper)
    killed_at = read_metrics(run_dir)[-1]["step"]
    victims = net.kill_host_processes(node1)
    start = time.monotonic()
    assert victims, "nothing of the job ran on node 1"
    while (ended := re.search(r"restart\.sh: exit code (\d+);", log_path.read_text())) is None:
        assert time.monotonic() - start < END_BOUND_S, f"the job did not end within {END_BOUND_S} s of the kill"
        time.sleep(0.2)
    print(f"preempted at step {stopped_at}; job ended {time.monotonic() - start:.1f} s after node 1's "
          f"{len(victims)} processes were killed at step {killed_at}, exit code {ended.group(1)}")
    assert int(ended.group(1)) != 0

    assert wrapper.wait(timeout=300) == 0, log_path.read_text()[-4000:]
    train_log = (run_dir / "train.log").read_text()
    assert "a collective failed" in train_log  # the surviving rank saw its peer vanish (exit 5)
    resumed = [int(step) for step in re.findall(r"resumed from \S+ at step (\d+)", train_log)]
    assert resumed[0] == stopped_at and killed_at - resumed[1] <= 2 + 1  # one interval + the step in flight
    check_losses(run_dir, expected)
    crossed = net.link_bytes() - start_bytes
    print(f"{crossed / 1e6:.0f} MB crossed the link (at least {expected['min_link_bytes'] / 1e6:.0f} MB expected)")
    assert crossed >= expected["min_link_bytes"]


@pytest.mark.multiprocess
def test_per_node_launch_without_ssh(net, hostfile, launch_env, expected, tmp_path, background):
    """launchers/node.sh started on each node with its rank: the two launches meet at node 0's
    address and train together across the link."""
    run_dir = tmp_path / "run"
    overrides = [*RUN, f"run_dir={run_dir}"]
    env = {"GLOO_SOCKET_IFNAME": net.interface, "OMP_NUM_THREADS": "1", "VENV": VENV}
    start_bytes = net.link_bytes()
    nodes = [
        background(host.command([str(LAUNCHERS / "node.sh"), str(hostfile), str(rank), *overrides]),
                   tmp_path, tmp_path / f"node{rank}.txt", **env)
        for rank, host in enumerate(net.hosts)
    ]
    for rank, node in enumerate(nodes):
        assert node.wait(timeout=300) == 0, (tmp_path / f"node{rank}.txt").read_text()[-4000:]
    assert "node_rank=1" in (tmp_path / "node1.txt").read_text()
    check_losses(run_dir, expected)
    crossed = net.link_bytes() - start_bytes
    print(f"{crossed / 1e6:.0f} MB crossed the link (at least {expected['min_link_bytes'] / 1e6:.0f} MB expected)")
    assert crossed >= expected["min_link_bytes"]
