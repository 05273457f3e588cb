"""Rank 0's view of a run: a step line at every logged step with the time left and, on a terminal,
a progress bar (tqdm) updated every step."""

import sys


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_step_line(r: dict, max_steps: int) -> str:
    loss = "skipped (non-finite)" if r["skipped"] else f"loss {r['loss']:.4f}"
    if r.get("val_loss") is not None:  # an evaluation ran after this step
        loss += f"  val_loss {r['val_loss']:.4f} (ppl {r['val_ppl']:.1f})"
    mfu = f"  MFU {r['mfu'] * 100:.1f}%" if r.get("mfu") is not None else ""
    eta = f"  ETA {format_duration(r['eta_s'])}" if r.get("eta_s") is not None else ""
    comm = f"  comm {r['comm_bytes'] / 1e6:.2f} MB" if r.get("comm_bytes") is not None else ""
    return (
        f"step {r['step']:>6}/{max_steps}  {loss}  lr {r['lr']:.2e}  "
        f"{r['tokens_per_s']:,.0f} tok/s  {r['step_time_s'] * 1000:.0f} ms/step  "
        f"{r['tflops']:.3f} TFLOP/s{mfu}  {r['mem_gb']:.2f} GB{comm}{eta}"
    )


class Progress:
    """Step lines on stdout; a bar on stderr as well when stderr is a terminal."""

    def __init__(self, max_steps: int, start_step: int, stream=None):
        self.max_steps = max_steps
        stream = stream if stream is not None else sys.stderr
        self.bar = None
        if stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", file=stream,
                            dynamic_ncols=True, desc="train")

    def step_done(self, completed: int) -> None:
        if self.bar is not None:
            self.bar.update(completed - self.bar.n)

    def logged(self, record: dict) -> None:
        line = format_step_line(record, self.max_steps)
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {record['loss']:.4f}" if record["loss"] is not None else "")
            self.bar.write(line, file=sys.stdout)  # above the bar, which stays at the bottom
        else:
            print(line, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
