"""Per-step training metrics: throughput, achieved FLOP/s and MFU, memory; written to metrics.jsonl,
DeepSpeed's monitor (TensorBoard, CSV), W&B and the progress display on rank 0."""

import json
import resource
import time
from pathlib import Path

from bigtrain.monitor.progress import Progress
from bigtrain.monitor.sinks import WandbSink
from bigtrain.monitor.system import SystemStats


def flops_per_token(matmul_params: int, num_layers: int, hidden_size: int, seq_len: int) -> float:
    """Training FLOPs per token, as in PaLM (Chowdhery et al. 2022, appendix B) and Megatron's MFU:
    6 * N for the forward and backward matmuls over N matmul parameters, plus 12 * L * d * T for the
    attention scores and their weighted sum over a context of T tokens (L layers, model width d)."""
    return 6.0 * matmul_params + 12.0 * num_layers * hidden_size * seq_len


def peak_memory_gb(device: str) -> float:
    """Peak memory of this rank: device memory on a GPU, resident set size on the CPU."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 1e9
    return peak_rss_gb()


def peak_rss_gb() -> float:
    """This process's own peak resident set size. Linux's VmHWM counts this program only; getrusage's
    ru_maxrss carries the parent's peak over through fork and exec, so a rank or child started from a
    large process (a notebook, a test session) would report the parent's. ru_maxrss is the fallback
    where there is no /proc."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux and BSD: KiB


def read_records(path: Path) -> tuple[list[dict], list[int]]:
    """The step records of a metrics.jsonl and the numbers of the lines that are not records (a line cut
    short by a crash mid-write, or garbage); a missing file has none."""
    if not path.is_file():
        return [], []
    records, bad = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad.append(number)
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            bad.append(number)
    return records, bad


class MetricsWriter:
    """Rank 0's sinks for one run: metrics.jsonl, DeepSpeed's monitor (TensorBoard, CSV as
    configured), W&B if configured, and the progress display. Adds to each step's record what only rank 0 knows: MFU,
    its CPU (and GPU) use, elapsed time and the time left."""

    def __init__(self, run_dir: str, monitor, max_steps: int, print_steps: bool, *,
                 start_step: int = 0, peak_tflops: float | None = None, world_size: int = 1,
                 system: SystemStats | None = None, wandb: WandbSink | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.monitor = monitor
        self.max_steps = max_steps
        self.peak_tflops = peak_tflops
        self.world_size = world_size
        self.system = system
        self.wandb = wandb
        self.progress = Progress(max_steps, start_step) if print_steps else None
        self.started = time.perf_counter()
        self._file = self.path.open("a")

    def start_from(self, step: int) -> None:
        """Make metrics.jsonl continue at `step`. A resumed run keeps the records up to its checkpoint and
        logs the later ones again as it retrains them; a fresh start keeps an earlier run's records in
        metrics.N.jsonl rather than erasing them. A line cut short by a crash mid-write is dropped."""
        self._file.close()
        records, _ = read_records(self.path)
        if step == 0 and records:
            number = 1
            while self.path.with_name(f"metrics.{number}.jsonl").exists():
                number += 1
            self.path.rename(self.path.with_name(f"metrics.{number}.jsonl"))
            records = []
        kept = [r for r in records if r["step"] <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a")

    def step_done(self, completed: int) -> None:
        if self.progress is not None:
            self.progress.step_done(completed)

    def write(self, record: dict) -> None:
        record = {**record, **self._rank0_fields(record)}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.monitor is not None and self.monitor.enabled:
            step = record["step"]
            self.monitor.write_events(
                [
                    (f"train/{k}", v, step)
                    for k, v in record.items()
                    if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
                ]
            )
        if self.wandb is not None:
            self.wandb.log(record)
        if self.progress is not None:
            self.progress.logged(record)

    def _rank0_fields(self, r: dict) -> dict:
        fields = {
            # model FLOP/s of the whole job over the peak of all its devices
            "mfu": r["tflops"] / (self.peak_tflops * self.world_size) if self.peak_tflops else None,
            "elapsed_s": time.perf_counter() - self.started,
            "eta_s": (self.max_steps - r["step"]) * r["step_time_s"],
        }
        if self.system is not None:
            fields.update(self.system.sample())
        return fields

    def close(self) -> None:
        self._file.close()
        if self.progress is not None:
            self.progress.close()
        if self.wandb is not None:
            self.wandb.finish()
