"""Python API for notebooks and scripts: `bigtrain.train(...)` and `DistributedTraining`.

    import bigtrain
    result = bigtrain.train(["train.max_steps=50"])            # one process, this one
    result = bigtrain.train(["zero=stage3"], nproc=2)           # two ranks under the deepspeed launcher
    cfg = bigtrain.compose(["model=tiny_gpt2"]); cfg.train.max_steps = 20
    result = bigtrain.train(config=cfg)

    from bigtrain import DistributedTraining
    DistributedTraining(["train.max_steps=30"]).train_distributed("tiny_llama", "corpus.txt", nodes=2)

Nothing heavy is imported until a run starts.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bigtrain import exit_codes
from bigtrain.config import ConfigError
from bigtrain.config import compose as _compose
from bigtrain.config.overrides import config_to_overrides
from bigtrain.config.validate import validate
from bigtrain.train import TrainResult

# What each exit code of a run means, for the message of a run that failed.
EXIT_MEANINGS = {
    exit_codes.CONFIG_ERROR: "bad config or input",
    exit_codes.NONFINITE: "stopped after repeated non-finite steps",
    exit_codes.CHECKPOINT_FAILED: "a checkpoint could not be saved",
    exit_codes.PEER_LOST: "a rank died or stopped answering",
    exit_codes.PREEMPTED: "stopped by a signal after saving",
    exit_codes.HANG: "a hang was detected",
}


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The composed config for `overrides`, to inspect or edit before `train(config=...)`."""
    return _compose(list(overrides))


def train(
    overrides: list[str] | None = None,
    config: DictConfig | dict | None = None,
    *,
    nproc: int = 1,
    launcher: str = "deepspeed",
    quiet: bool = False,
) -> TrainResult:
    """Train and return a TrainResult (final_loss, steps, run_dir, checkpoint, metrics, exit_code).

    `config` (a composed DictConfig or a dict of keys) is applied on top of `overrides`. With
    nproc=1 the run trains in this process; with more it launches `nproc` ranks on this machine
    (`launcher`: deepspeed or torchrun) and waits for them. A config that cannot work raises
    ConfigError before anything starts; a run that fails returns its exit_code (result.ok is False).
    """
    overrides = list(overrides or [])
    cfg = _compose(overrides)
    if config is not None:
        cfg = OmegaConf.merge(cfg, config if isinstance(config, DictConfig) else OmegaConf.create(config))
        if nproc > 1:
            overrides = config_to_overrides(overrides, cfg)
    validate(cfg, nproc)
    if nproc == 1:
        return _train_here(cfg)
    return _launch(cfg, overrides, nproc, launcher, quiet)


def _train_here(cfg: DictConfig) -> TrainResult:
    """One rank in this process, with a process group of its own on a fresh port; the environment and
    the process-wide state a run leaves behind are put back afterwards, so runs can follow each other."""
    from bigtrain.distributed import free_port
    from bigtrain.train import run

    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {key: os.environ.get(key) for key in keys}
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    try:
        result = run(cfg)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
        raise RuntimeError(
            f"training stopped with exit code {code} ({EXIT_MEANINGS.get(code, 'error')}); "
            f"see {cfg.run_dir}/train.log"
        ) from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _forget_process_state()
    result.metrics = read_metrics(Path(result.run_dir))
    return result


def _forget_process_state() -> None:
    """Process-wide state one run leaves and the next must not inherit: the process groups cached
    by bigtrain and DeepSpeed (destroyed with the run's default group), transformers' ZeRO-3 switch,
    and the run's log file."""
    import logging

    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    import bigtrain.distributed
    bigtrain.distributed._long_wait_group = None
    unset_hf_deepspeed_config()
    logger = logging.getLogger("bigtrain")
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


def _launch(cfg: DictConfig, overrides: list[str], nproc: int, launcher: str, quiet: bool) -> TrainResult:
    """`nproc` ranks on this machine under a launcher; output goes to run_dir/launch.log (and here)."""
    from bigtrain.distributed import free_port

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not any(o.startswith("run_dir=") for o in overrides):  # every rank must write to the same run dir
        overrides = [*overrides, f"run_dir={run_dir}"]
    command = launch_command(launcher, nproc, overrides, free_port())
    env = dict(os.environ)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a launcher sets these for its ranks
    with open(run_dir / "launch.log", "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, start_new_session=True)
        for line in proc.stdout:
            log.write(line)
            if not quiet:
                print(line, end="", flush=True)
        code = proc.wait()
    from bigtrain.checkpoint import checkpoint_dir, read_latest

    records = read_metrics(run_dir)
    latest = read_latest(checkpoint_dir(cfg))  # checkpoint.dir may lie outside the run dir
    return TrainResult(
        final_loss=records[-1]["loss"] if records else None,
        steps=records[-1]["step"] if records else 0,
        run_dir=str(run_dir),
        checkpoint=str(latest) if latest else None,
        exit_code=code,
        metrics=records,
        command=command,
    )


def launch_command(launcher: str, nproc: int, overrides: list[str], port: int) -> list[str]:
    bin_dir = Path(sys.executable).parent
    if launcher == "deepspeed":
        return [str(bin_dir / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port),
                "--module", "bigtrain.train", *overrides]
    if launcher == "torchrun":
        return [str(bin_dir / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(port),
                "-m", "bigtrain.train", *overrides]
    raise ConfigError(f"launcher={launcher!r} is not a launcher bigtrain knows. Use deepspeed or torchrun.")


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


class DistributedTraining:
    """Train a model on some data across N processes of this machine (CPU ranks, or one per GPU).

        DistributedTraining(["train.max_steps=100"]).train_distributed("tiny_llama", "corpus.txt", nodes=2)

    `overrides` apply to every run (steps, batch, ZeRO stage...). For several machines, use the
    multi-node launchers (launchers/multinode.sh) with the same overrides.
    """

    def __init__(self, overrides: list[str] | None = None, *, run_dir: str | None = None,
                 launcher: str = "deepspeed", quiet: bool = False):
        self.overrides = list(overrides or [])
        self.run_dir = run_dir
        self.launcher = launcher
        self.quiet = quiet

    def train_distributed(self, model: Any, data: Any = None, nodes: int = 2) -> dict:
        """Train `model` on `data` with `nodes` processes; return the model name, nodes used, status,
        final loss, checkpoint path, run dir, steps, per-step losses and the launch command.

        model: a model name from conf/model (tiny_llama, gpt2_small, ...), a local Hugging Face model
               folder (its weights are the starting point), or a transformers PretrainedConfig.
        data:  None (the bundled corpus), a text/JSON Lines/Parquet/CSV file or a folder of them, or a
               `datasets` Dataset (or DatasetDict, whose train split is used) with a text column.
        """
        from bigtrain.specs import data_overrides, model_overrides

        model_name, model_args, staged_config = model_overrides(model)
        run_dir = Path(self.run_dir or f"runs/distributed-{model_name}-{time.strftime('%Y%m%d-%H%M%S')}").absolute()
        overrides = [*model_args, *data_overrides(data, run_dir / "data"), *self.overrides, f"run_dir={run_dir}"]
        if staged_config is not None:  # a config object: written out as overrides the ranks compose
            cfg = _compose(overrides)
            cfg.model.hf_config = staged_config
            overrides = config_to_overrides(overrides, cfg)
        result = train(overrides, nproc=nodes, launcher=self.launcher, quiet=self.quiet)
        return {
            "model": model_name,
            "nodes": nodes,
            "status": "completed" if result.ok else f"failed (exit code {result.exit_code}: "
                      f"{EXIT_MEANINGS.get(result.exit_code, 'error')}; see {result.run_dir}/launch.log)",
            "final_loss": result.final_loss,
            "checkpoint": result.checkpoint,
            "run_dir": result.run_dir,
            "steps": result.steps,
            "losses": [r["loss"] for r in result.metrics],
            "command": result.command,
        }
