"""What a first run on GPUs needs, checked on a machine without one (issue 19, items 1-15).

Nothing here starts a rank: the GPU side is stood in for by a patched `torch.cuda`, stub `nvidia-smi`,
`deepspeed` and `torchrun` commands on PATH, a stub NVML module and fake CUDA events; the bigtrain code
under test runs for real. Tests that need a process group share one of a single rank, in this process.
What only a GPU can show (kernels, throughput, NCCL itself) is left to benchmarks/gpu_check.sh.
"""

import contextlib
import io
import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bigtrain.config import compose
from bigtrain.config.validate import validate
from bigtrain.errors import ConfigError, NonFiniteError, PeerLostError

REPO = Path(__file__).resolve().parent.parent
# A Llama small enough to build and step in milliseconds, for the tests that make a model.
SMALL_MODEL = ["model.hf_config.num_hidden_layers=1", "model.hf_config.hidden_size=32",
               "model.hf_config.intermediate_size=64", "model.hf_config.num_attention_heads=2",
               "model.hf_config.num_key_value_heads=2", "model.hf_config.vocab_size=512"]


# ------------------------------------------------------------------------------------ helpers


@pytest.fixture
def gpus(monkeypatch):
    """Make torch report `n` usable GPUs (and nothing else about CUDA): what bigtrain asks before a run."""

    def make(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    # DeepSpeed picks its accelerator once per process, asking torch.cuda: let it see the real machine.
    from deepspeed.accelerator import get_accelerator

    get_accelerator()
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "DS_ACCELERATOR"):
        monkeypatch.delenv(name, raising=False)
    return make


@pytest.fixture
def no_training(monkeypatch):
    """The entry point under test must refuse before training: reaching the run fails the test."""
    from bigtrain.runtime import run

    monkeypatch.setattr(run, "run", lambda cfg: pytest.fail("the config was accepted and a run started"))


def config_json(capsys, *args: str) -> dict:
    """`bigtrain config ARGS`, run through the CLI's own entry point: the derived DeepSpeed config."""
    from bigtrain.cli import main

    assert main(["config", "--world-size", "1", *args]) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])  # after whatever DeepSpeed logged on importing


def write_script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body).lstrip())
    path.chmod(0o755)
    return path


def fake_nvidia_smi(bin_dir: Path, gpus: int) -> None:
    """An `nvidia-smi` that lists `gpus` GPUs, as the real one does with -L; with 0 it fails, as it
    does on a machine without a working driver."""
    if gpus == 0:
        write_script(bin_dir / "nvidia-smi", "exit 9\n")
        return
    listing = "".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08x}-aaaa)\\n" for i in range(gpus))
    write_script(bin_dir / "nvidia-smi", f'printf "{listing}"\n')


def one_paragraph(text: str) -> bool:
    return text.strip() != "" and "\n" not in text.strip() and "Traceback" not in text


@pytest.fixture(scope="module")
def process_group():
    """A process group of one rank, in this process (gloo, an in-memory store): for the code that calls
    collectives or asks its rank. No other process is started."""
    import deepspeed
    import deepspeed.comm
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    saved = os.environ.get("DS_ACCELERATOR")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # unless DeepSpeed chose its accelerator already
    try:
        get_accelerator()
    finally:
        if saved is None:
            os.environ.pop("DS_ACCELERATOR")
    ours = not dist.is_initialized()
    if ours:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend="gloo")
    yield
    if ours:
        deepspeed.comm.destroy_process_group()


class StubEngine:
    """Stands in for DeepSpeed's engine around a real one-layer model: the loss of every micro-batch is
    `loss_value`, and `applied(step)` says whether DeepSpeed applied optimizer step `step` (0-based); an
    fp16 engine that did not skipped it for overflowing gradients."""

    def __init__(self, grad_accum: int = 1, fp16: bool = True, applied=lambda step: True, on_step=None):
        self.module = torch.nn.Linear(4, 1)
        self.device = torch.device("cpu")
        self.grad_accum = grad_accum
        self.fp16 = fp16
        self.applied = applied
        self.on_step = on_step  # called at each accumulation boundary, as DeepSpeed's step updates its scaler
        self.loss_value = 2.0
        self.micro = 0
        self.optimizer_steps = 0

    def gradient_accumulation_steps(self) -> int:
        return self.grad_accum

    def get_lr(self) -> list[float]:
        return [1e-3]

    def __call__(self, input_ids, use_cache=False, num_items_in_batch=None, **_):
        out = self.module(torch.ones(1, 4)).sum()
        return SimpleNamespace(loss=out * 0.0 + self.loss_value, logits=out.reshape(1, 1))

    def backward(self, loss) -> None:
        loss.backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro + 1) % self.grad_accum == 0

    def step(self) -> None:
        boundary = self.is_gradient_accumulation_boundary()
        self.micro += 1
        if boundary:
            self.optimizer_steps += 1
            if self.on_step is not None:
                self.on_step(self.optimizer_steps - 1)

    def was_step_applied(self) -> bool:
        return self.applied(self.optimizer_steps - 1)

    def fp16_enabled(self) -> bool:
        return self.fp16

    def get_global_grad_norm(self) -> float:
        return 1.0


class StubLoader:
    def __init__(self):
        self.plan = SimpleNamespace(global_batch=2, samples_before=lambda step: 2 * step)

    def step_label_count(self, step: int) -> int:
        return 8

    def micro_batch(self, step: int, micro: int) -> dict:
        ids = torch.ones(2, 4, dtype=torch.long)
        return {"input_ids": ids, "labels": ids}

    def samples_by_source(self, completed: int) -> dict:
        return {}


class StubCheckpointer:
    save_final = False

    def __init__(self):
        self.saved = []

    def due(self, completed: int) -> bool:
        return False

    def save(self, completed: int, samples: int) -> None:
        self.saved.append(completed)

    def latest(self):
        return None


def make_trainer(engine: StubEngine, *overrides: str):
    from bigtrain.distributed.topology import ProcessGrid
    from bigtrain.runtime.trainer import Trainer

    cfg = compose(["logging.interval=1000", "train.max_steps=20", *overrides])
    checkpointer = StubCheckpointer()
    trainer = Trainer(cfg, engine, StubLoader(), checkpointer, None, grid=ProcessGrid.of(cfg, 1),
                      flops_per_token=1.0, device="cpu")
    return trainer, checkpointer


class FakeEvents:
    """CUDA events with a clock that ticks 1 ms per recording; counts every host synchronization."""

    def __init__(self):
        self.clock = 0
        self.synchronized = 0
        self.made = []

    def __call__(self):
        events = self

        class Event:
            def __init__(self):
                self.at = None
                events.made.append(self)

            def record(self):
                events.clock += 1
                self.at = events.clock

            def elapsed_time(self, end) -> float:
                return float(end.at - self.at)

            def synchronize(self):
                events.synchronized += 1

        return Event()


# ------------------------------------------------------------------ 1. the optimizer on a GPU


@pytest.mark.parametrize("zero", ["stage0", "stage1", "stage2", "stage3"])
def test_a_gpu_config_steps_with_torchs_fused_adamw_not_a_jit_built_op(capsys, zero):
    """Item 1: without optimizer offload, the GPU config asks DeepSpeed for torch's fused AdamW (shipped in
    the torch wheel), not DeepSpeed's FusedAdam, which is JIT-built from CUDA sources and needs nvcc.
    DeepSpeed's own choice of class is run on the derived parameters."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    ds = config_json(capsys, "--device", "cuda", "precision=bf16", f"zero={zero}")
    params = dict(ds["optimizer"]["params"])
    assert params["torch_adam"] is True and params["fused"] is True
    # The torch_adam branch of DeepSpeed's choice reads nothing from the engine.
    optimizer_class, extra = DeepSpeedEngine.get_optimizer_configuration(object(), params, params.pop("adam_w_mode"))
    assert optimizer_class is torch.optim.AdamW
    optimizer = optimizer_class([torch.nn.Parameter(torch.ones(3))], **params, **extra)
    assert optimizer.defaults["fused"] is True


def test_an_offloaded_optimizer_is_left_to_deepspeeds_cpu_adam(capsys):
    """Item 1, the other side: with the optimizer offloaded, DeepSpeed steps it on the CPU with its
    DeepSpeedCPUAdam; asking for torch's AdamW there would make DeepSpeed use it instead."""
    ds = config_json(capsys, "--device", "cuda", "zero=stage2", "offload=optimizer")
    assert "torch_adam" not in ds["optimizer"]["params"] and "fused" not in ds["optimizer"]["params"]
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


# --------------------------------------------------------- 2. ops DeepSpeed compiles on a GPU


@pytest.fixture
def no_cuda_toolkit(monkeypatch, tmp_path):
    """A machine whose PATH and environment show no nvcc."""
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)


@pytest.mark.parametrize("overrides,named", [
    (["zero=stage3", "offload=nvme"], "offload=nvme (DeepSpeed's async_io op)"),
    (["zero=stage3", "offload=nvme_optimizer"], "offload=nvme_optimizer (DeepSpeed's async_io op)"),
    (["zero=stage3", "comm=zeropp"], "comm=zeropp's quantization (DeepSpeed's quantizer op)"),
])
def test_ops_that_need_nvcc_are_refused_on_a_gpu_without_a_cuda_toolkit(gpus, no_cuda_toolkit, no_training, capsys,
                                                                           tmp_path, overrides, named):
    """Item 2: NVMe offload and ZeRO++ quantization are compiled from CUDA sources on a GPU; without nvcc
    the entry point refuses them before any work, exit 2, one paragraph saying what to install."""
    from bigtrain.train import main

    gpus(1)
    code = main(["train.device=cuda", *overrides, f"offload.nvme_path={tmp_path}", f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert named in err and "nvcc" in err and "CUDA_HOME" in err and "cuda-toolkit" in err, err
    assert err.startswith("bigtrain: config error: ") and one_paragraph(err), err
    assert not (tmp_path / "run").exists()


def test_a_cuda_toolkit_in_cuda_home_is_found_and_zeropp_without_quantization_needs_none(gpus, no_cuda_toolkit,
                                                                                          monkeypatch, tmp_path):
    """Item 2: the toolkit check accepts $CUDA_HOME/bin/nvcc, and hpZ alone (no build) needs no toolkit."""
    from bigtrain.config.machine import cuda_toolkit

    gpus(2)
    validate(compose(["train.device=cuda", "zero=stage3", "comm=zeropp_hpz"]), 2)
    with pytest.raises(ConfigError, match="nvcc"):
        validate(compose(["train.device=cuda", "zero=stage3", "comm=zeropp"]), 2)
    nvcc = write_script(tmp_path / "cuda" / "bin" / "nvcc", "exit 0\n")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    assert cuda_toolkit() == str(nvcc)
    validate(compose(["train.device=cuda", "zero=stage3", "comm=zeropp"]), 2)


# ------------------------------------------------------------------ 3. DS_ACCELERATOR=cpu


def test_auto_device_follows_ds_accelerator_cpu_on_a_gpu_machine(gpus, monkeypatch):
    """Item 3: the test suite sets DS_ACCELERATOR=cpu; on a GPU machine train.device=auto must then
    train on the CPU (not build the model for CUDA while DeepSpeed runs on the CPU)."""
    from bigtrain.config.derived import resolve_device

    gpus(2)
    auto = compose(["train.device=auto"])
    assert resolve_device(auto) == "cuda"
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert resolve_device(auto) == "cpu"
    assert resolve_device(compose(["train.device=cuda"])) == "cuda"  # an explicit choice stays


def test_cpu_ranks_select_deepspeeds_cpu_accelerator_and_gpu_ranks_do_not(monkeypatch):
    """Item 3: a CPU run tells DeepSpeed to use its CPU accelerator (it would pick CUDA on a GPU box); a
    GPU run leaves DeepSpeed's detection alone."""
    from bigtrain.distributed.process_group import select_accelerator

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # keeps the thread count out of this test
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    select_accelerator("cuda")
    assert "DS_ACCELERATOR" not in os.environ
    select_accelerator("cpu")
    assert os.environ["DS_ACCELERATOR"] == "cpu"


def test_prebuild_compiles_the_cpu_ops_under_the_cpu_accelerator(monkeypatch):
    """Item 3: `make setup` prebuilds the CPU ops the suite loads; on a GPU machine DeepSpeed would make
    CUDA builders, so the build reruns itself with DS_ACCELERATOR=cpu."""
    from bigtrain.tools import prebuild

    calls = []
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(prebuild.subprocess, "run",
                        lambda command, env: calls.append((command, env)) or subprocess.CompletedProcess(command, 0))
    with pytest.raises(SystemExit) as exited:
        prebuild.main()
    assert exited.value.code == 0
    [(command, env)] = calls
    assert command == [sys.executable, "-m", "bigtrain.tools.prebuild"] and env["DS_ACCELERATOR"] == "cpu"


# -------------------------------------------------------------- 4. CUDA_VISIBLE_DEVICES kept


def run_launcher(tmp_path: Path, script: str, gpus: int, env: dict,
                 args=("zero=stage2",)) -> subprocess.CompletedProcess:
    """Run launchers/SCRIPT with a stub nvidia-smi listing `gpus` GPUs and stub deepspeed/torchrun
    commands that print the arguments they were given."""
    venv = tmp_path / "venv"
    for command in ("deepspeed", "torchrun"):
        write_script(venv / "bin" / command, f'echo "{command} $*"\n')
    fake_nvidia_smi(tmp_path / "bin", gpus)
    full_env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "VENV": str(venv), **env}
    return subprocess.run(["bash", str(REPO / "launchers" / script), *args], env=full_env, capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.mark.commands
@pytest.mark.parametrize("env,gpus,expected", [
    ({"CUDA_VISIBLE_DEVICES": "2,3"}, 4, "--include localhost:2,3"),
    ({"CUDA_VISIBLE_DEVICES": "2,3", "NPROC": "1"}, 4, "--include localhost:2"),
    ({}, 4, "--include localhost:0,1,2,3"),
    ({"NPROC": "3"}, 0, "--num_gpus 3"),  # no GPU: CPU ranks
])
def test_local_launcher_keeps_the_jobs_gpus(tmp_path, env, gpus, expected):
    """Item 4: launchers/local.sh names the GPUs the job may use (--include), so DeepSpeed's launcher does
    not take GPUs 0..N-1 on a shared node whatever CUDA_VISIBLE_DEVICES says."""
    proc = run_launcher(tmp_path, "local.sh", gpus, env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"deepspeed {expected} --module bigtrain.train zero=stage2"


@pytest.mark.commands
def test_local_launcher_refuses_gpus_named_by_uuid(tmp_path):
    """Item 4: the deepspeed launcher takes GPU indices only; UUID/MIG entries are refused, pointing to
    torchrun, rather than silently replaced by 0..N-1."""
    proc = run_launcher(tmp_path, "local.sh", 2, {"CUDA_VISIBLE_DEVICES": "GPU-00000001-aaaa,GPU-00000000-aaaa"})
    assert proc.returncode == 2 and proc.stdout == ""
    assert "UUID or MIG" in proc.stderr and "torchrun.sh" in proc.stderr


@pytest.mark.commands
def test_torchrun_launcher_starts_one_rank_per_visible_gpu(tmp_path):
    """Items 4 and 12: torchrun keeps CUDA_VISIBLE_DEVICES, and its default rank count is the visible
    GPUs (2 here), not every GPU nvidia-smi lists and not a fixed 2."""
    visible = run_launcher(tmp_path, "torchrun.sh", 8, {"CUDA_VISIBLE_DEVICES": "5,7"})
    one = run_launcher(tmp_path, "torchrun.sh", 8, {"CUDA_VISIBLE_DEVICES": "6"})
    assert visible.stdout.strip() == "torchrun --nproc_per_node 2 -m bigtrain.train zero=stage2", visible.stderr
    assert one.stdout.strip() == "torchrun --nproc_per_node 1 -m bigtrain.train zero=stage2", one.stderr


def test_the_python_api_launches_on_the_visible_gpus(monkeypatch):
    """Item 4: bigtrain.fit(nproc=N) and the benchmarks build their deepspeed command the same way."""
    from bigtrain.api.training import deepspeed_devices, launch_command

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    assert deepspeed_devices(2, on_gpu=True) == ["--include", "localhost:4,5"]
    assert "--include" in launch_command("deepspeed", 3, ["zero=stage2"], port=29999, on_gpu=True)
    assert deepspeed_devices(2, on_gpu=False) == ["--num_gpus", "2"]
    with pytest.raises(ConfigError, match="makes 3 visible"):
        deepspeed_devices(4, on_gpu=True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-5a1b2c3d-0000")
    with pytest.raises(ConfigError, match="UUID or MIG"):
        deepspeed_devices(1, on_gpu=True)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert deepspeed_devices(2, on_gpu=True) == ["--num_gpus", "2"]


# -------------------------------------------------------------------- 5. the CUDA RNG state


def test_rng_state_holds_only_this_ranks_gpu_and_loads_weights_only(monkeypatch, tmp_path):
    """Item 5: a checkpoint's RNG file holds the generator of the rank's own (current) GPU, and a resume
    restores that one alone, so a rank that sees fewer GPUs than the saving one did still resumes. The
    state loads with the weights-only unpickler."""
    from bigtrain.components.checkpoint.rng import capture_rng_state, restore_rng_state

    this_gpu = torch.arange(16, dtype=torch.uint8)
    restored = []

    def every_gpu(*_):
        raise AssertionError("the state of every visible GPU was read or written")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": this_gpu.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", every_gpu)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", every_gpu)

    torch.manual_seed(7)
    state = capture_rng_state()
    expected = torch.rand(3)
    torch.save(state, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)
    torch.manual_seed(99)
    restore_rng_state(loaded)
    assert torch.equal(torch.rand(3), expected)
    assert len(restored) == 1 and torch.equal(restored[0], this_gpu)


def test_a_state_saved_without_cuda_leaves_the_gpu_generator_alone(monkeypatch):
    """Item 5: a rank that never initialised CUDA saves no CUDA state, and restoring it does not touch the
    GPU generator."""
    from bigtrain.components.checkpoint.rng import capture_rng_state, restore_rng_state

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda *a, **k: pytest.fail("the CUDA generator was set"))
    state = capture_rng_state()
    assert "cuda" not in state
    restore_rng_state(state)


# ----------------------------------------------------------- 6. the throughput benchmark on a GPU


def test_the_gpu_benchmarks_default_batch_is_one_the_planner_says_fits(gpus):
    """Item 6: the GPU mode's micro-batch is the largest (halving from 8) that bigtrain's planner fits in
    one GPU: llama_1b in bf16 at 2048 tokens does not fit 80 GB at micro-batch 8."""
    from dataclasses import replace

    from benchmarks.throughput import fitting_micro_batch
    from bigtrain.tools.plan import USABLE, Hardware, plan, process_baseline_gb

    gpus(1)
    base = ["model=llama_1b", "precision=bf16", "zero=stage2", "train.seq_len=2048", "train.device=cuda"]
    hardware = Hardware(nodes=1, ranks_per_node=1, device="cuda", device_memory_gb=80.0, cpu_memory_gb=1e6,
                        nvme_gb=None)

    def device_gb(micro: int) -> float:
        _, _, options = plan([*base, f"train.micro_batch_size={micro}", "run_dir=/tmp/unused"], replace(hardware),
                             process_baseline_gb(1.0))
        return next(o for o in options if o.stage == 2 and o.offload == "none").estimate.device_gb

    micro = fitting_micro_batch(base, 1, 80.0)
    assert micro < 8 and device_gb(8) > USABLE * 80
    assert device_gb(micro) <= USABLE * 80 < device_gb(2 * micro)


def test_the_plain_pytorch_loop_trains_on_the_device_it_is_given(monkeypatch, tmp_path):
    """Item 6: the plain-PyTorch loop takes its device (model, batch, autocast, fused AdamW); run here with
    device='cpu' on a one-layer model, in this process rather than the child it normally runs in."""
    from omegaconf import OmegaConf

    from benchmarks import throughput

    OmegaConf.save(compose(SMALL_MODEL), tmp_path / "config.yaml")

    def run_here(command, **_):
        assert command[:2] == [sys.executable, "-c"]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(command[2], {"__name__": "__main__"})  # noqa: S102 - the benchmark's own code
        return subprocess.CompletedProcess(command, 0, out.getvalue(), "")

    monkeypatch.setattr(throughput.subprocess, "run", run_here)
    result = throughput.run_plain(str(tmp_path), batch=2, seq_len=16, steps=2, warmup=1, device="cpu")
    assert result["tokens_per_s"] > 0 and result["step_time_s"] > 0 and result["peak_mem_gb"] > 0


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                       ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0)])
def test_gpu_mfu_is_against_the_datasheets_dense_bf16_peak(monkeypatch, name, peak):
    """Item 6: MFU on a GPU divides by the device's datasheet peak (what the benchmark and the run
    report), not by a peak measured on the CPU."""
    from bigtrain.monitor.peak import resolve_peak_tflops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    value, source = resolve_peak_tflops(None, "cuda", "bf16")
    assert value == peak and source == f"datasheet of {name} (bf16)"


# ------------------------------------------------------------ 7. gloo's address on GPU jobs


@pytest.mark.parametrize("nccl,gloo,expected", [
    ("eth0", None, "eth0"),
    ("ib0,eth1", None, "ib0,eth1"),
    ("^docker,lo", None, None),  # an exclusion means nothing to gloo
    ("=eth0", None, None),
    ("eth0", "eth2", "eth2"),  # the user's choice stays
    (None, None, None),
])
def test_gloo_interface_defaults_to_nccls_plain_interface(nccl, gloo, expected):
    """Item 7: GPU jobs also run a gloo group (long waits, checkpoint decisions); with only
    NCCL_SOCKET_IFNAME set, gloo takes the same interface instead of wherever the host name resolves."""
    from bigtrain.distributed.process_group import set_network_defaults

    env = {k: v for k, v in (("NCCL_SOCKET_IFNAME", nccl), ("GLOO_SOCKET_IFNAME", gloo)) if v is not None}
    set_network_defaults(env)
    assert env.get("GLOO_SOCKET_IFNAME") == expected


def test_a_multinode_gpu_launch_checks_the_gloo_address_unless_nccl_names_an_interface(gpus, monkeypatch, tmp_path):
    """Items 7 and 12: `bigtrain hosts` for a two-node GPU job (2 GPUs a node) refuses a node whose name
    resolves to loopback, as it does for CPU ranks; NCCL_SOCKET_IFNAME alone is enough to pass, since
    gloo then uses that interface. The GPU count is checked against this node's slots, not the job's."""
    from bigtrain.tools import hosts

    gpus(2)
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hosts, "local_gloo_address", lambda: "gpu-node-a 127.0.1.1")  # Ubuntu's /etc/hosts
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("gpu-node-a slots=2\ngpu-node-b slots=2\n")
    with pytest.raises(ConfigError, match="127.0.1.1, a loopback address.*GLOO_SOCKET_IFNAME"):
        hosts.check_launch(hostfile, ["train.device=cuda"], ssh=False, node_rank=0)
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth0")
    assert [h.name for h in hosts.check_launch(hostfile, ["train.device=cuda"], ssh=False, node_rank=1)] == \
        ["gpu-node-a", "gpu-node-b"]
    hostfile.write_text("gpu-node-a slots=4\ngpu-node-b slots=4\n")
    with pytest.raises(ConfigError, match="4 ranks on this node train on GPUs, one each, but 2 GPU"):
        hosts.check_launch(hostfile, ["train.device=cuda"], ssh=False, node_rank=0)


# --------------------------------------------------------------------- 8. fp16 overflow runs


def test_an_fp16_run_that_keeps_overflowing_stops_with_the_nonfinite_code_without_saving(process_group):
    """Item 8: with torch's AdamW DeepSpeed's fp16 wrapper (FP16_UnfusedOptimizer) clamps the loss scale at
    its floor and goes on skipping; the loop counts consecutive overflow skips and stops at
    fault.max_overflow_steps with NonFiniteError (exit 3, which restart.sh does not relaunch)."""
    engine = StubEngine(applied=lambda step: False)
    trainer, checkpointer = make_trainer(engine, "precision=fp16", "fault.max_overflow_steps=4")
    with pytest.raises(NonFiniteError, match="4 consecutive steps .* overflowed in fp16") as stopped:
        trainer.train(0)
    assert stopped.value.exit_code == 3
    assert engine.optimizer_steps == 4 and checkpointer.saved == []


def test_occasional_fp16_overflows_are_routine_loss_scale_calibration(process_group):
    """Item 8: an overflow now and then (every other step here) is loss-scale calibration: the count is of
    consecutive skips, so the run goes on to the end; such steps are not counted as non-finite."""
    engine = StubEngine(applied=lambda step: step % 2 == 1)
    trainer, _ = make_trainer(engine, "precision=fp16", "fault.max_overflow_steps=2", "train.max_steps=9")
    outcome = trainer.train(0)
    assert outcome.completed_steps == 9 and trainer.skipped_steps == 0


def test_the_loss_scale_floor_exception_becomes_the_nonfinite_exit(process_group):
    """Item 8: DeepSpeed's ZeRO fp16 optimizers raise a bare Exception when the loss scale is at its
    minimum (the real DynamicLossScaler raises it here); the rank stops with NonFiniteError (exit 3)
    rather than exit 1, which restart.sh would relaunch into the same divergence."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    scaler = DynamicLossScaler(init_scale=1.0, scale_window=1000, min_scale=1.0, delayed_shift=1,
                               consecutive_hysteresis=False)
    engine = StubEngine(on_step=lambda step: scaler.update_scale(True))
    trainer, checkpointer = make_trainer(engine, "precision=fp16")
    with pytest.raises(NonFiniteError, match="fp16's loss scale fell to its minimum") as stopped:
        trainer.train(0)
    assert stopped.value.exit_code == 3 and checkpointer.saved == []


# ----------------------------------------------------------- 9. fp16 ZeRO-0 export precision


@pytest.mark.parametrize("layout", ["per_parameter", "flat"])
def test_an_fp16_zero0_export_has_the_fp32_master_weights(process_group, tmp_path, layout):
    """Item 9: at ZeRO-0 an fp16 run's fp32 master weights are in the optimizer part of the model-states
    file; export writes those, not the 16-bit module weights. The masters come from DeepSpeed's own
    FP16_UnfusedOptimizer (what torch's AdamW gets) after a real step; "flat" is FP16_Optimizer's form
    of the same tensors (one per parameter group, as with DeepSpeed's FusedAdam)."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    from bigtrain.components.models import build_model
    from bigtrain.components.optimizer import parameter_groups
    from bigtrain.tools.export import fp32_state_dict

    cfg = compose(SMALL_MODEL)
    no_decay = list(cfg.optimizer.no_decay)
    # On the accelerator DeepSpeed uses: the CPU here, a GPU where DeepSpeed chose one.
    model = build_model(cfg.model, seed=3).half().to(get_accelerator().current_device_name())
    inner = torch.optim.AdamW(parameter_groups(model, 0.1, no_decay), lr=1e-2)
    optimizer = FP16_UnfusedOptimizer(inner, dynamic_loss_scale=True, clip_grad=1.0, verbose=False)
    for param in model.parameters():
        param.grad = torch.randn_like(param) * 1e-3
    optimizer.step()
    masters = optimizer.state_dict()
    if layout == "flat":
        masters["fp32_groups_flat"] = [torch.cat([t.reshape(-1) for t in group])
                                       for group in masters.pop("fp32_groups")]
    tag_dir = tmp_path / "step_00000001"
    tag_dir.mkdir()
    torch.save({"module": model.state_dict(), "optimizer": masters}, tag_dir / "mp_rank_00_model_states.pt")
    (tag_dir / "manifest.json").write_text(json.dumps({"step": 1, "files": {}}))

    exported = fp32_state_dict(tag_dir, build_model(cfg.model, seed=3), no_decay)
    names = {id(p): name for name, p in model.named_parameters()}
    expected = {names[id(p)]: master for fp16_group, master_group in zip(optimizer.fp16_groups, optimizer.fp32_groups)
                for p, master in zip(fp16_group, master_group)}
    assert expected.keys() <= exported.keys()
    for name, master in expected.items():
        assert exported[name].dtype == torch.float32 and torch.equal(exported[name], master.cpu()), name
    # The masters hold what fp16 cannot: reading the module weights instead would fail above.
    assert any(not torch.equal(master, master.half().float()) for master in expected.values())


# ------------------------------------------------------------- 10. the same init on every stage


def test_weights_are_drawn_from_the_cpu_generator_on_any_device():
    """Item 10: ZeRO-3 initialises gathered parameters on the GPU; bigtrain makes transformers' initialisers
    draw from the CPU generator there too, so every stage starts from the same weights. A model on
    another device (meta here) draws exactly what the same model on the CPU draws, no more, no less."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from bigtrain.components.models import build_model_config, random_init_on_cpu

    config = build_model_config(compose(SMALL_MODEL).model)

    def draws_after_init(device: str, on_cpu: bool) -> torch.Tensor:
        with torch.device(device), no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        torch.manual_seed(5)
        with random_init_on_cpu() if on_cpu else contextlib.nullcontext():
            model.init_weights()
        return torch.rand(4)  # the generator's position after the init

    on_cpu = draws_after_init("cpu", on_cpu=True)
    assert torch.equal(draws_after_init("meta", on_cpu=True), on_cpu)
    assert torch.equal(draws_after_init("cpu", on_cpu=False), on_cpu)  # the same draws as plain torch init
    torch.manual_seed(5)
    untouched = torch.rand(4)
    assert torch.equal(draws_after_init("meta", on_cpu=False), untouched), "a meta init draws nothing itself"
    assert not torch.equal(on_cpu, untouched)


# ------------------------------------------------------------ 11. CPU offload from GPU ranks


def test_offloaded_states_are_pinned_by_default_on_gpus_only(capsys):
    """Item 11: page-locked buffers speed up the host-device copies of offloaded states on a GPU; on the
    CPU there is nothing to copy to. An explicit offload.pin_memory wins."""
    gpu = config_json(capsys, "--device", "cuda", "zero=stage3", "offload=full")["zero_optimization"]
    cpu = config_json(capsys, "--device", "cpu", "zero=stage3", "offload=full")["zero_optimization"]
    unpinned = config_json(capsys, "--device", "cuda", "zero=stage3", "offload=full",
                           "offload.pin_memory=false")["zero_optimization"]
    assert gpu["offload_optimizer"]["pin_memory"] is True and gpu["offload_param"]["pin_memory"] is True
    assert cpu["offload_optimizer"]["pin_memory"] is False and cpu["offload_param"]["pin_memory"] is False
    assert unpinned["offload_optimizer"]["pin_memory"] is False


@pytest.fixture
def torch_threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


@pytest.mark.parametrize("offload,threads", [("optimizer", 4), ("nvme_optimizer", 4), ("none", None)])
def test_gpu_ranks_stepping_the_optimizer_on_the_cpu_share_the_cores(gpus, monkeypatch, torch_threads, tmp_path,
                                                                     offload, threads):
    """Items 11 and 15: a GPU run whose optimizer steps on the CPU (offload to CPU memory or NVMe) gives
    each of the node's ranks (LOCAL_SIZE, as DeepSpeed's launcher sets it) its share of the cores; and a
    GPU run resets CUDA's peak-memory counters when it starts, so an in-process run reports its own peak.
    The run is started as the Python API starts one, up to the process group (which is not made here)."""
    from bigtrain.distributed import process_group
    from bigtrain.distributed.process_group import Ranks
    from bigtrain.runtime.run import Run

    gpus(4)
    resets = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: resets.append(a))
    monkeypatch.setattr(process_group, "init_distributed", lambda timeout_s: Ranks(rank=0, local_rank=0, world_size=4))
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_SIZE", "4")
    torch.set_num_threads(1)
    zero = "stage2" if offload == "optimizer" else "stage3"
    run = Run(compose(["train.device=cuda", f"zero={zero}", f"offload={offload}", f"offload.nvme_path={tmp_path}"]))
    run._join_process_group()
    assert torch.get_num_threads() == (threads or 1)
    assert len(resets) == 1 and run.grid.data == 4


# ---------------------------------------------------------- 12. ranks per node and visible GPUs


def test_more_ranks_on_a_node_than_visible_gpus_is_refused_before_launch(gpus, monkeypatch):
    """Item 12: two ranks on a one-GPU machine would fail in rank 1 with 'invalid device ordinal'; it is
    refused at composition, counting the ranks of this node as the launcher states them."""
    gpus(1)
    cfg = compose(["train.device=cuda"])
    with pytest.raises(ConfigError) as refused:
        validate(cfg, 2)
    assert "invalid device ordinal" in str(refused.value) and refused.value.exit_code == 2
    assert one_paragraph(str(refused.value))
    validate(cfg, 1)
    for launcher_variable in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):  # torchrun's, DeepSpeed launcher's
        monkeypatch.setenv(launcher_variable, "1")  # two nodes of one rank each
        validate(cfg, 2)
        monkeypatch.setenv(launcher_variable, "2")
        with pytest.raises(ConfigError, match="2 ranks on this node"):
            validate(cfg, 2)
        monkeypatch.delenv(launcher_variable)


def test_the_python_api_refuses_more_ranks_than_gpus_without_launching(gpus, monkeypatch, tmp_path):
    """Item 12: bigtrain.fit(nproc=2) on a one-GPU machine is refused before any launcher starts."""
    import bigtrain
    from bigtrain.api import training

    gpus(1)
    monkeypatch.setattr(training, "launch", lambda *a, **k: pytest.fail("a launcher was started"))
    with pytest.raises(ConfigError, match="invalid device ordinal"):
        bigtrain.fit(["train.device=cuda", f"run_dir={tmp_path / 'run'}"], nproc=2)


def test_a_multinode_gpu_job_from_the_api_is_checked_against_one_nodes_gpus(gpus, monkeypatch, tmp_path):
    """Item 12: a hostfile job of two 8-GPU nodes has 16 ranks, 8 on each node: the check before launch
    compares this node's slots with its GPUs (not all 16 ranks), and still refuses more slots than GPUs."""
    from bigtrain.api import distributed
    from bigtrain.runtime.run import TrainResult

    gpus(8)
    launched = []
    monkeypatch.setattr(distributed, "launch", lambda cfg, command, quiet=False: launched.append(command) or
                        TrainResult(final_loss=None, steps=0, run_dir=str(tmp_path / "run"), checkpoint=None))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("gpu-node-a slots=8\ngpu-node-b slots=8\n")
    job = distributed.GPUAcceleratedTraining(hostfile=str(hostfile), run_dir=str(tmp_path / "run"), quiet=True)
    result = job.train_distributed("tiny_llama", None, nodes=2, use_gpus=True)
    assert result["device"] == "GPUs" and len(launched) == 1 and launched[0][0].endswith("multinode.sh")
    hostfile.write_text("gpu-node-a slots=9\ngpu-node-b slots=9\n")
    with pytest.raises(ConfigError, match="9 ranks on this node train on GPUs, one each, but 8 GPU"):
        job.train_distributed("tiny_llama", None, nodes=2, use_gpus=True)
    assert len(launched) == 1


# ------------------------------------------------------------- 13. no host sync per micro-batch


def test_gpu_phases_are_timed_with_events_read_once_per_logged_step():
    """Item 13: on a GPU each phase is bracketed by CUDA events (the host does not wait); the events are
    read when a step is logged, with a single synchronize on the newest one."""
    from bigtrain.monitor.timing import StepTimer

    events = FakeEvents()
    timer = StepTimer(True, device="cuda", event_factory=events)
    for _ in range(3):  # three steps of one micro-batch each
        for phase in ("data", "forward", "backward", "optimizer"):
            with timer.phase(phase):
                pass
    assert events.synchronized == 0 and len(events.made) == 24
    window = timer.take_window(3)
    assert events.synchronized == 1
    assert window == {"data_s": 0.001, "forward_s": 0.001, "backward_s": 0.001, "optimizer_s": 0.001}
    assert timer.take_window(1) == dict.fromkeys(window)  # nothing timed since: no figures


def test_the_step_timer_makes_timing_cuda_events_on_a_gpu(monkeypatch):
    """Item 13: by default a GPU timer creates torch.cuda.Event(enable_timing=True); a CPU one makes none."""
    from bigtrain.monitor.timing import StepTimer

    made = []
    events = FakeEvents()
    monkeypatch.setattr(torch.cuda, "Event", lambda **kwargs: made.append(kwargs) or events())
    with StepTimer(True, device="cuda").phase("forward"):
        pass
    with StepTimer(True, device="cpu").phase("forward"):
        pass
    assert made == [{"enable_timing": True}, {"enable_timing": True}]


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_a_step_exchanges_its_flags_once_per_micro_batch_and_carries_the_stop_request(process_group, monkeypatch,
                                                                                      grad_accum):
    """Item 13: the non-finite check and the stop request travel in one all-reduce: one per micro-batch
    (one per step at grad_accum=1), none for the stop flag apart; a stop requested on a rank reaches the
    loop through it. GPU phase events are not waited on during the step."""
    import torch.distributed as dist

    from bigtrain.monitor.timing import StepTimer

    engine = StubEngine(grad_accum=grad_accum, fp16=False)
    trainer, _ = make_trainer(engine)
    events = FakeEvents()
    trainer.timer = StepTimer(True, device="cuda", event_factory=events)
    reductions = []
    real_all_reduce = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *a, **k: reductions.append(tensor.clone()) or
                        real_all_reduce(tensor, *a, **k))
    result = trainer.steps.run(0)
    assert len(reductions) == grad_accum and not trainer.stop_requested and not result.skipped
    assert events.synchronized == 0 and len(events.made) == 8 * grad_accum

    trainer.stop_signal.received = signal.SIGTERM
    reductions.clear()
    trainer.steps.run(1)
    assert len(reductions) == grad_accum and trainer.stop_requested
    assert reductions[0].tolist() == [0.0, 1.0]  # [non-finite, stop] in the first micro-batch's exchange

    engine.loss_value = math.nan  # the same exchange still keeps a non-finite loss out of the step
    assert trainer.steps.run(2).skipped and engine.optimizer_steps == 2


# -------------------------------------------------------------------------- 14. NCCL failures


@pytest.mark.parametrize("env,expected", [
    ({}, "2"),
    ({"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}, "1"),
    ({"NCCL_ASYNC_ERROR_HANDLING": "1"}, None),  # the older name, set by the user: left to it
])
def test_nccl_errors_raise_in_the_rank_instead_of_aborting_the_process(env, expected):
    """Item 14: torch's default for a failed or timed-out NCCL collective aborts the process (SIGABRT,
    exit 134); with TORCH_NCCL_ASYNC_ERROR_HANDLING=2 it raises in the rank, which exits with the
    documented lost-peer code 5 as on gloo. A user's own setting is kept."""
    from bigtrain.distributed.process_group import set_network_defaults

    set_network_defaults(env)
    assert env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING") == expected


def test_a_failed_nccl_collective_ends_the_rank_with_the_lost_peer_code():
    """Item 14: the errors torch raises for NCCL (DistBackendError, and NCCL's text in a RuntimeError) are
    read as a lost peer: the run ends with PeerLostError, exit code 5; an unrelated error is not."""
    import torch.distributed

    from bigtrain.distributed.process_group import Ranks
    from bigtrain.runtime.run import Run

    class Failing:
        def __init__(self, err):
            self.err = err

        def train(self, start_step):
            raise self.err

    nccl_errors = [
        # the type alone tells: this message names no backend
        torch.distributed.DistBackendError("[Rank 1] Process group watchdog thread terminated with exception: "
                                           "Watchdog caught collective operation timeout"),
        RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1975, remote process exited or there was a network error"),
    ]
    for err in nccl_errors:
        run = Run(compose([]))
        run.ranks = Ranks(rank=0, local_rank=0, world_size=2)
        with pytest.raises(PeerLostError) as lost:
            run._train(Failing(err), 0)
        assert lost.value.exit_code == 5 and run.peer_lost
    run = Run(compose([]))
    run.ranks = Ranks(rank=0, local_rank=0, world_size=2)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run._train(Failing(RuntimeError("shape mismatch")), 0)
    assert not run.peer_lost


# ------------------------------------------------------------------------------- 15. smaller


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("flash_attn") is not None,
                    reason="flash-attn is installed here")
def test_flash_attention_without_the_package_is_refused_at_composition_on_a_gpu(gpus, no_training, capsys, tmp_path):
    """Item 15: attn_implementation=flash_attention_2 without flash-attn would fail in every rank after
    launch; on a GPU machine the entry point refuses it first (exit 2, one paragraph, the way out)."""
    from bigtrain.train import main

    gpus(1)
    code = main(["train.device=cuda", "model.attn_implementation=flash_attention_2", f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "needs the flash-attn package" in err and "attn_implementation=sdpa" in err, err
    assert one_paragraph(err) and not (tmp_path / "run").exists()


class StubNVML:
    """The pynvml calls bigtrain makes, on a machine of four GPUs; records which handle was asked for."""

    class NVMLError(Exception):
        pass

    def __init__(self):
        self.asked = []

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, index):
        self.asked.append(("index", index))
        return f"gpu{index}"

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self.asked.append(("uuid", uuid))
        return uuid

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUUID(self, handle):
        return handle

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=87)

    def nvmlDeviceGetPowerUsage(self, handle):
        return 512000  # mW

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        return 1000000  # mJ


@pytest.mark.parametrize("visible,local_rank,asked", [
    ("2,3", 1, ("index", 3)),
    ("GPU-8f3c2a10-aaaa,GPU-11aa22bb-cccc", 1, ("uuid", "GPU-11aa22bb-cccc")),
    ("MIG-5a1b2c3d-0000-1111", 0, ("uuid", "MIG-5a1b2c3d-0000-1111")),
    (None, 2, ("index", 2)),
])
def test_nvml_samples_the_gpu_this_rank_trains_on(monkeypatch, visible, local_rank, asked):
    """Item 15: NVML numbers every GPU of the machine while torch numbers the visible ones; the GPU
    sampled is the rank's own, matched by index or by UUID (GPU-... and MIG-... entries)."""
    from bigtrain.monitor.system import SystemStats

    nvml = StubNVML()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    stats = SystemStats("cuda", local_rank).sample()
    assert nvml.asked == [asked]
    assert stats["gpu_util"] == 87.0 and stats["gpu_power_w"] == 512.0 and stats["gpu_energy_j"] == 0.0


@pytest.mark.commands
def test_multinode_launch_forwards_the_gpu_environment_and_the_overrides_exactly(tmp_path):
    """Item 15 (and issue 18 item 7): multinode.sh passes the ranks on every node what a GPU job needs
    (CUDA_HOME, PATH with the environment's bin/, PYTORCH_CUDA_ALLOC_CONF, TORCH_NCCL_*, NCCL_*) through
    DeepSpeed's env file, and the overrides as bytes no remote shell reinterprets. The host check and
    DeepSpeed's launcher are stubbed: the second copies the env file it was given."""
    from bigtrain.config.overrides import decode_overrides

    venv = tmp_path / "venv"
    write_script(venv / "bin" / "python", f"""
        [ "$1 $2 $3" = "-m bigtrain.cli hosts" ] && exit 0
        exec {sys.executable} "$@"
    """)
    write_script(venv / "bin" / "deepspeed",
                 f'cp "$DS_ENV_FILE" {tmp_path / "env_file"}; echo "$*" > {tmp_path / "args"}\n')
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("gpu-node-a slots=8\ngpu-node-b slots=8\n")
    hostile = ["run_dir=/tmp/x|touch pwned", "model.name='a b' \"c\" $(id) `id`"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "VENV": str(venv), "CUDA_HOME": "/opt/cuda-12.8",
           "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "TORCH_NCCL_BLOCKING_WAIT": "1",
           "NCCL_SOCKET_IFNAME": "eth0", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7", "UNRELATED": "x"}
    proc = subprocess.run(["bash", str(REPO / "launchers" / "multinode.sh"), str(hostfile), *hostile], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    forwarded = dict(line.split("=", 1) for line in (tmp_path / "env_file").read_text().splitlines())
    for name in ("CUDA_HOME", "PYTORCH_CUDA_ALLOC_CONF", "TORCH_NCCL_BLOCKING_WAIT", "NCCL_SOCKET_IFNAME",
                 "CUDA_VISIBLE_DEVICES"):
        assert forwarded[name] == env[name], name
    assert forwarded["PATH"] == f"{os.path.realpath(venv)}/bin:/usr/bin:/bin" and "UNRELATED" not in forwarded
    assert decode_overrides(forwarded["BIGTRAIN_OVERRIDES"]) == hostile
    launched = (tmp_path / "args").read_text()
    assert "pwned" not in launched and "--module bigtrain.train" in launched

    refused = subprocess.run(["bash", str(REPO / "launchers" / "multinode.sh"), str(hostfile)],
                             env={**env, "PYTORCH_CUDA_ALLOC_CONF": "a$(touch pwned)"}, capture_output=True,
                             text=True, timeout=120, cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "PYTORCH_CUDA_ALLOC_CONF contains a shell character" in refused.stderr


def test_auto_says_so_when_this_machines_gpus_are_unusable_by_torch(monkeypatch, tmp_path, caplog):
    """Item 15: a torch wheel that cannot use the machine's GPUs (CPU-only, or built for a newer driver)
    makes train.device=auto train on the CPU; it says so, once, naming the GPUs nvidia-smi lists."""
    from bigtrain.config import derived

    fake_nvidia_smi(tmp_path / "bin", 2)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(derived, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="bigtrain"):
        assert derived.resolve_device(compose(["train.device=auto"])) == "cpu"
        assert derived.resolve_device(compose(["train.device=auto"])) == "cpu"
    warnings = [r.getMessage() for r in caplog.records if "cannot use them" in r.getMessage()]
    assert len(warnings) == 1 and "nvidia-smi lists 2" in warnings[0]

    fake_nvidia_smi(tmp_path / "bin", 0)  # no driver: a CPU machine, nothing to say
    monkeypatch.setattr(derived, "_warned", False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bigtrain"):
        assert derived.resolve_device(compose(["train.device=auto"])) == "cpu"
    assert not [r for r in caplog.records if "cannot use them" in r.getMessage()]
