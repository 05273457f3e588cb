"""One real 2-rank run shared by the monitoring, report, sample and planner tests (launched once per
test session): the debug Llama, ZeRO-2, 10 steps, with the CSV and W&B (offline) sinks and DeepSpeed's flops
profiler on."""

import json

from conftest import FAST, run_bigtrain

OVERRIDES = [*FAST, "zero=stage2", "logging.csv=true", "logging.wandb=true", "logging.flops_profile_step=3"]
RANKS = 2


def monitored_run(tmp_path_factory) -> tuple:
    """(run dir, the launcher's stdout): the run is made by the first test that asks for it."""
    base = tmp_path_factory.getbasetemp() / "monitored-run"
    run_dir, stdout_file = base / "run", base / "stdout.txt"
    if not stdout_file.exists():
        base.mkdir(exist_ok=True)
        proc = run_bigtrain("torchrun", RANKS, [*OVERRIDES, f"run_dir={run_dir}"], cwd=base)
        stdout_file.write_text(proc.stdout)
    return run_dir, stdout_file.read_text()


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
