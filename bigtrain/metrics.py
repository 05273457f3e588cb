"""Per-step training metrics: throughput, achieved FLOP/s, memory; written to metrics.jsonl,
TensorBoard (through DeepSpeed's monitor) and a step line on rank 0."""

import json
import resource
import sys
from pathlib import Path

import torch


def flops_per_token(matmul_params: int, num_layers: int, hidden_size: int, seq_len: int) -> float:
    """Training FLOPs per token, as in PaLM (Chowdhery et al. 2022, appendix B) and Megatron's MFU:
    6 * N for the forward and backward matmuls over N matmul parameters, plus 12 * L * d * T for the
    attention scores and their weighted sum over a context of T tokens (L layers, model width d)."""
    return 6.0 * matmul_params + 12.0 * num_layers * hidden_size * seq_len


def peak_memory_gb(device: str) -> float:
    """Peak memory of this rank: device memory on a GPU, resident set size on the CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux reports KiB
    return kilobytes * 1024 / 1e9


class MetricsWriter:
    """Rank 0's sinks for one run: metrics.jsonl, TensorBoard events and the console."""

    def __init__(self, run_dir: str, monitor, max_steps: int, print_steps: bool):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.monitor = monitor
        self.max_steps = max_steps
        self.print_steps = print_steps
        self._file = self.path.open("a")

    def drop_after(self, step: int) -> None:
        """Forget records past `step`: a resumed run trains those steps again and logs them anew."""
        self._file.close()
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))
        self._file = self.path.open("a")

    def write(self, record: dict) -> None:
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
        if self.print_steps:
            print(self.format_line(record), file=sys.stdout, flush=True)

    def format_line(self, r: dict) -> str:
        loss = "skipped (non-finite)" if r["skipped"] else f"loss {r['loss']:.4f}"
        comm = f"  comm {r['comm_bytes'] / 1e6:.2f} MB" if r.get("comm_bytes") is not None else ""
        return (
            f"step {r['step']:>6}/{self.max_steps}  {loss}  lr {r['lr']:.2e}  "
            f"{r['tokens_per_s']:,.0f} tok/s  {r['step_time_s'] * 1000:.0f} ms/step  "
            f"{r['tflops']:.3f} TFLOP/s  {r['mem_gb']:.2f} GB{comm}"
        )

    def close(self) -> None:
        self._file.close()
