"""launchers/slurm.sbatch inside a job as SLURM would run it: SLURM's variables set, and `scontrol` and
`srun` replaced by stand-ins that behave as SLURM's do for this script (srun runs the task once per
node with that node's SLURM_NODEID). The script's real launch check and launchers/node.sh run; only
the final `deepspeed` is a stand-in that records its arguments, which are asserted per node."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.commands

NODES = ["gpu-a01", "gpu-a02", "gpu-b07"]

SCONTROL = """#!/usr/bin/env bash
# `scontrol show hostnames LIST`: one node name per line (the list's expansion is given here).
[ "$1 $2" = "show hostnames" ] && [ "$3" = "$SLURM_JOB_NODELIST" ] || exit 1
printf '%s\\n' {nodes}
"""
SRUN = """#!/usr/bin/env bash
# Record the srun arguments, then run the task once per node, as srun does, with SLURM's per-task
# variables.
printf '%s\\n' "$@" > "$RECORD/srun_args"
while [[ $1 == --* ]]; do shift; done
pids=()
for i in $(seq 0 $((SLURM_JOB_NUM_NODES - 1))); do
    SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "$@" & pids+=($!)
done
code=0
for pid in "${{pids[@]}}"; do wait "$pid" || code=$?; done
exit $code
"""
DEEPSPEED = """#!/usr/bin/env bash
# Stand-in for the deepspeed launcher: record what this node would have launched.
{python} -c 'import json, os, sys; json.dump({{"args": sys.argv[1:], "cwd": os.getcwd()}}, open(os.environ["RECORD"] + "/node" + os.environ["SLURM_NODEID"], "w"))' "$@"
"""


def write_executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def slurm_job(tmp_path):
    """A submit folder (the launchers, as bigtrain's folder would hold them), stand-ins for
    scontrol, srun and the environment's deepspeed, and the variables of a 3-node job."""
    submit = tmp_path / "submit"
    submit.mkdir()
    (submit / "launchers").symlink_to(REPO / "launchers")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_executable(bin_dir / "scontrol", SCONTROL.format(nodes=" ".join(NODES)))
    write_executable(bin_dir / "srun", SRUN)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    # The environment's own python, so the launch check runs for real; only deepspeed is replaced.
    write_executable(venv / "bin" / "python", f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    write_executable(venv / "bin" / "deepspeed", DEEPSPEED.format(python=sys.executable))
    record = tmp_path / "record"
    record.mkdir()
    env = dict(
        os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", VENV=str(venv), RECORD=str(record),
        SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-a[01-02],gpu-b07", SLURM_JOB_NUM_NODES="3",
        SLURM_NNODES="3", SLURM_SUBMIT_DIR=str(submit), SLURM_GPUS_ON_NODE="2", RESTART_DELAY_S="0",
        # The stand-in nodes share this machine, whose name may resolve to loopback: name the
        # interface, as a CPU cluster's job script would.
        GLOO_SOCKET_IFNAME="lo",
    )

    def run(*overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(REPO / "launchers" / "slurm.sbatch"), *overrides], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120)

    return run, submit, record


def test_sbatch_derives_hostfile_master_and_node_ranks(slurm_job):
    run, submit, record = slurm_job
    done = run("zero=stage1", "train.max_steps=50")
    assert done.returncode == 0, done.stderr

    hostfile = submit / "runs" / "slurm-4242.hostfile"
    assert hostfile.read_text() == "".join(f"{n} slots=2\n" for n in NODES)
    assert "bigtrain: 3 nodes x 2 slots, master gpu-a01:29500" in done.stderr
    srun_args = (record / "srun_args").read_text().splitlines()
    assert srun_args[:4] == ["--nodes=3", "--ntasks=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    for rank in range(len(NODES)):
        launched = json.loads((record / f"node{rank}").read_text())
        assert launched["cwd"] == str(submit)
        assert launched["args"] == [
            "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank), "--master_addr", "gpu-a01",
            "--master_port", "29500", "--module", "bigtrain.train", "zero=stage1", "train.max_steps=50",
        ]


def test_sbatch_refuses_a_layout_the_allocation_cannot_hold(slurm_job):
    """3 nodes x 2 GPUs = 6 ranks cannot make a global batch of 32 from micro-batches of 8: one
    message, exit 2, and no task is started."""
    run, _, record = slurm_job
    done = run("train.global_batch_size=32")
    assert done.returncode == 2
    assert "gives 6 slots (gpu-a01 2 + gpu-a02 2 + gpu-b07 2), so the job would have 6 processes" in done.stderr
    assert "train.global_batch_size=32 cannot hold with 6 data-parallel ranks" in done.stderr
    assert not (record / "srun_args").exists()
