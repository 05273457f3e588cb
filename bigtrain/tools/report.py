"""`bigtrain report`: a run's loss and throughput curves (PNG), a one-page HTML report and a summary,
all from its metrics.jsonl."""

import base64
import html
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from bigtrain.errors import ConfigError
from bigtrain.monitor.metrics import read_records
from bigtrain.monitor.progress import format_duration
from bigtrain.monitor.timing import PHASES

FIGURE_INCHES, FIGURE_DPI = (12, 8), 100  # a 1200 x 800 PNG


@dataclass
class Summary:
    steps: int
    train_time_s: float
    tokens_seen: int
    final_loss: float | None
    best_loss: float | None
    best_loss_step: int | None
    tokens_per_s: float
    mfu: float | None
    peak_mem_gb: float
    final_val_loss: float | None = None
    best_val_loss: float | None = None
    best_val_loss_step: int | None = None

    def rows(self) -> list[tuple[str, str]]:
        best = f"{self.best_loss:.4f} at step {self.best_loss_step}" if self.best_loss is not None else "n/a"
        validation = []
        if self.final_val_loss is not None:
            validation = [("final val_loss", f"{self.final_val_loss:.4f}"),
                          ("best val_loss", f"{self.best_val_loss:.4f} at step {self.best_val_loss_step}")]
        return [
            ("steps", str(self.steps)),
            ("time to train", f"{format_duration(self.train_time_s)} ({self.train_time_s:.1f} s)"),
            ("tokens seen", f"{self.tokens_seen:,}"),
            ("final loss", f"{self.final_loss:.4f}" if self.final_loss is not None else "n/a"),
            ("best loss", best),
            *validation,
            ("throughput", f"{self.tokens_per_s:,.0f} tokens/s"),
            ("MFU", f"{self.mfu * 100:.1f}%" if self.mfu is not None else "n/a"),
            ("peak memory", f"{self.peak_mem_gb:.2f} GB per rank"),
        ]

    def lines(self) -> list[str]:
        return [f"{name:<15}{value}" for name, value in self.rows()]


def run_records(run_dir: Path) -> list[dict]:
    """The run's step records. A last line cut short (the run crashed while writing it) is left out;
    anything else that is not a record is refused, naming the line."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no metrics.jsonl, so it is not a bigtrain run dir (or the run "
                          "has not logged a step yet). Pass the run_dir of a run.")
    records, bad = read_records(path)
    lines = len(path.read_text(errors="replace").rstrip("\n").splitlines())
    damaged = [n for n in bad if n != lines]
    if damaged:
        raise ConfigError(
            f"{path} line {damaged[0]} is not a step record ({len(damaged)} such line(s)): the file was altered or "
            "is not a bigtrain metrics file. Restore it, or remove the damaged lines to report on the rest."
        )
    if not records:
        raise ConfigError(f"{path} has no step record yet: the run has not logged a step.")
    required = {"step", "tokens_per_s", "step_time_s", "mem_gb"}
    incomplete = next((r for r in records if not required <= r.keys()), None)
    if incomplete is not None:
        raise ConfigError(f"{path} has a record without {sorted(required - incomplete.keys())} (step "
                          f"{incomplete['step']}): it is not a bigtrain metrics file.")
    return records


def summarize(records: list[dict]) -> Summary:
    last = records[-1]
    # The first logged step includes warm-up (allocation, kernel selection); the averages leave it out.
    steady = records[1:] or records
    losses = [(r["loss"], r["step"]) for r in records if r.get("loss") is not None]
    best = min(losses) if losses else (None, None)
    evaluations = [(r["val_loss"], r["step"]) for r in records if r.get("val_loss") is not None]
    best_val = min(evaluations) if evaluations else (None, None)
    tokens_per_step = last["tokens_per_s"] * last["step_time_s"]
    if last.get("elapsed_s") is not None:
        train_time = last["elapsed_s"]
    else:  # records of older runs: each one's mean step time times the steps it covers
        previous = [0] + [r["step"] for r in records[:-1]]
        train_time = sum(r["step_time_s"] * (r["step"] - p) for r, p in zip(records, previous))
    mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
    return Summary(
        steps=last["step"],
        train_time_s=train_time,
        tokens_seen=round(last["step"] * tokens_per_step),
        final_loss=last.get("loss"),
        best_loss=best[0],
        best_loss_step=best[1],
        tokens_per_s=sum(r["tokens_per_s"] for r in steady) / len(steady),
        mfu=sum(mfus) / len(mfus) if mfus else None,
        peak_mem_gb=max(r["mem_gb"] for r in records),
        final_val_loss=evaluations[-1][0] if evaluations else None,
        best_val_loss=best_val[0],
        best_val_loss_step=best_val[1],
    )


def plot(records: list[dict], title: str, out: Path) -> Path:
    """Loss, throughput (with MFU) and the step-time split against the step, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (loss_ax, speed_ax, split_ax) = plt.subplots(3, 1, figsize=FIGURE_INCHES, dpi=FIGURE_DPI, sharex=True)
    fig.suptitle(title)
    loss_ax.plot(steps, [r.get("loss") if r.get("loss") is not None else float("nan") for r in records],
                 marker=".", color="tab:blue", label="training")
    evaluated = [r for r in records if r.get("val_loss") is not None]
    if evaluated:  # held-out loss on the same chart, so overfitting shows as the curves parting
        loss_ax.plot([r["step"] for r in evaluated], [r["val_loss"] for r in evaluated], marker="o",
                     color="tab:red", label="validation")
        loss_ax.legend(loc="upper right", fontsize="small")
    loss_ax.set_ylabel("loss")
    loss_ax.grid(alpha=0.3)

    speed_ax.plot(steps, [r["tokens_per_s"] for r in records], marker=".", color="tab:green")
    speed_ax.set_ylabel("tokens/s")
    speed_ax.grid(alpha=0.3)
    if any(r.get("mfu") is not None for r in records):
        mfu_ax = speed_ax.twinx()
        mfu_ax.plot(steps, [100 * r["mfu"] if r.get("mfu") is not None else float("nan") for r in records],
                    color="tab:orange", linestyle="--")
        mfu_ax.set_ylabel("MFU %", color="tab:orange")

    bottom = [0.0] * len(records)
    for phase in PHASES:
        values = [1000 * (r.get(f"{phase}_s") or 0.0) for r in records]
        split_ax.bar(steps, values, bottom=bottom, label=phase, width=_bar_width(steps))
        bottom = [b + v for b, v in zip(bottom, values)]
    split_ax.plot(steps, [1000 * r["step_time_s"] for r in records], color="black", marker=".", label="whole step")
    split_ax.set_ylabel("ms per step")
    split_ax.set_xlabel("step")
    split_ax.legend(loc="upper right", fontsize="small", ncol=5)
    split_ax.grid(alpha=0.3)

    fig.tight_layout()
    fig.savefig(out, dpi=FIGURE_DPI)  # a fixed size, not bbox="tight", so the PNG is always 1200 x 800
    plt.close(fig)
    return out


def _bar_width(steps: list[int]) -> float:
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    return 0.8 * min(gaps) if gaps else 0.8


def write_html(run_dir: Path, summary: Summary, png: Path, out: Path) -> Path:
    image = base64.b64encode(png.read_bytes()).decode()
    config = run_dir / "config.yaml"
    config_text = config.read_text() if config.is_file() else "(no config.yaml)"
    rows = "".join(
        f"<tr><th>{html.escape(name)}</th><td>{html.escape(value)}</td></tr>" for name, value in summary.rows()
    )
    out.write_text(f"""<!doctype html>
<html><head><meta charset="utf-8"><title>bigtrain report: {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;max-width:1240px;margin:1em auto}} th{{text-align:left;padding-right:2em}}
pre{{background:#f4f4f4;padding:.5em;max-height:20em;overflow:auto}}</style></head>
<body><h1>{html.escape(run_dir.name)}</h1><p>{html.escape(str(run_dir))}</p>
<table>{rows}</table>
<img src="data:image/png;base64,{image}" width="1200" alt="loss, throughput and step time">
<details><summary>config.yaml</summary><pre>{html.escape(config_text)}</pre></details>
</body></html>
""")
    return out


def report(run_dir: str, out_dir: str | None = None) -> tuple[Summary, Path, Path]:
    """Write report.png and report.html (in `out_dir`, default the run dir); return the summary and paths."""
    run = Path(run_dir)
    records = run_records(run)
    summary = summarize(records)
    out = Path(out_dir) if out_dir else run
    out.mkdir(parents=True, exist_ok=True)
    png = plot(records, f"{run.name}: {summary.steps} steps, best loss "
                        f"{summary.best_loss if summary.best_loss is not None else float('nan'):.4f}",
               out / "report.png")
    page = write_html(run, summary, png, out / "report.html")
    (out / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
    return summary, png, page
