"""`DistributedTraining` and `GPUAcceleratedTraining`: train a model on some data across N processes,
in the form the project's seed document describes.

    from bigtrain import DistributedTraining, GPUAcceleratedTraining
    result = DistributedTraining().train_distributed({"model_name": "tiny_llama"},
                                                     {"samples": 100000, "features": 128}, nodes=2)
    result["model_name"], result["nodes_used"], result["status"]      # tiny_llama 2 distributed_trained
    GPUAcceleratedTraining().train_distributed(model, data, nodes=8, use_gpus=True)["device"]  # GPUs
"""

import logging
import time
from pathlib import Path
from typing import Any

from bigtrain.api.training import describe_exit, fit, launch, with_run_dir
from bigtrain.config import compose
from bigtrain.config.overrides import config_to_overrides
from bigtrain.errors import ConfigError

log = logging.getLogger("bigtrain.api")
LAUNCHERS = Path(__file__).resolve().parents[2] / "launchers"


class DistributedTraining:
    """Train a model on some data across N processes.

        DistributedTraining(["train.max_steps=100"]).train_distributed("tiny_llama", "corpus.txt", nodes=2)

    "nodes" are processes on this machine (CPU ranks, or one per GPU), unless a `hostfile` is given:
    then the job runs on the hostfile's machines through launchers/multinode.sh (pdsh over ssh), and
    `nodes` must equal the number of hosts in it. `overrides` apply to every run (steps, batch, ZeRO
    stage...).
    """

    #: `status` of a run that finished
    TRAINED = "distributed_trained"

    def __init__(self, overrides: list[str] | None = None, *, run_dir: str | None = None,
                 launcher: str = "deepspeed", hostfile: str | None = None, quiet: bool = False):
        self.overrides = list(overrides or [])
        self.run_dir = run_dir
        self.launcher = launcher
        self.hostfile = hostfile
        self.quiet = quiet

    def train_distributed(self, model: Any, data: Any = None, nodes: int = 3) -> dict:
        """Train `model` on `data` with `nodes` processes; return the model name, nodes used, status,
        final loss, checkpoint path, run dir, steps, per-step losses and the launch command.

        model: a model name from conf/model (tiny_llama, gpt2_small, ...), a local Hugging Face model
               folder (its weights are the starting point), a transformers PretrainedConfig, or a dict
               {"model_name": NAME} with NAME one of the first two.
        data:  None (the bundled corpus), a text/JSON Lines/Parquet/CSV file or a folder of them, a
               `datasets` Dataset (or DatasetDict, whose train split is used) with a text column, or a
               dict describing the data: "path" (a file or folder as above; default: the bundled
               corpus), "text_field", "features" (tokens per sample: train.seq_len) and "samples" (at
               most this many samples of the data are trained on: data.max_samples).
        """
        return self._train(model, data, nodes, [])

    def _train(self, model: Any, data: Any, nodes: int, extra: list[str]) -> dict:
        from bigtrain.api.specs import data_overrides, model_overrides

        if not isinstance(nodes, int) or nodes < 1:
            raise ConfigError(f"nodes={nodes!r}: give the number of processes to train with, 1 or more.")
        model_name, model_args, staged_config = model_overrides(model)
        run_dir = Path(self.run_dir or f"runs/distributed-{model_name}-{time.strftime('%Y%m%d-%H%M%S')}").absolute()
        overrides = [*model_args, *data_overrides(data, run_dir / "data"), *self.overrides, *extra,
                     f"run_dir={run_dir}"]
        if staged_config is not None:  # a config object: written out as overrides the ranks compose
            cfg = compose(overrides)
            cfg.model.hf_config = staged_config
            overrides = config_to_overrides(overrides, cfg)
        log.info("Starting distributed training across %d nodes...", nodes)
        if self.hostfile:
            result = self._train_on_hosts(overrides, nodes)
        else:
            result = fit(overrides, nproc=nodes, launcher=self.launcher, quiet=self.quiet)
        log.info("Distributed training %s.", "complete" if result.ok else "failed")
        return {
            "model_name": model_name,
            "nodes_used": nodes,
            "status": self.TRAINED if result.ok else describe_exit(result.exit_code, result.run_dir),
            "model": model_name,
            "nodes": nodes,
            "final_loss": result.final_loss,
            "checkpoint": result.checkpoint,
            "run_dir": result.run_dir,
            "steps": result.steps,
            "losses": [r["loss"] for r in result.metrics],
            "command": result.command,
        }

    def _train_on_hosts(self, overrides: list[str], nodes: int):
        from bigtrain.config.validate import validate
        from bigtrain.tools.hosts import read_hostfile, world_size

        hosts = read_hostfile(self.hostfile)
        if len(hosts) != nodes:
            raise ConfigError(
                f"nodes={nodes} but hostfile {self.hostfile} lists {len(hosts)} hosts. Pass nodes={len(hosts)}, "
                "or a hostfile with one line per node."
            )
        cfg = compose(overrides)
        validate(cfg, world_size(hosts), local_ranks=hosts[0].slots)  # launched from the first host
        command = [str(LAUNCHERS / "multinode.sh"), str(Path(self.hostfile).absolute()), *with_run_dir(overrides, cfg)]
        return launch(cfg, command, self.quiet)


class GPUAcceleratedTraining(DistributedTraining):
    """DistributedTraining on GPUs (one process per GPU) or, with use_gpus=False, on CPU ranks; the
    result says which in "device" ("GPUs" or "CPUs"). Asking for GPUs where none is visible is
    refused before anything starts."""

    TRAINED = "distributed_trained_with_acceleration"

    def train_distributed(self, model: Any, data: Any = None, nodes: int = 3, use_gpus: bool = True) -> dict:
        device = "GPUs" if use_gpus else "CPUs"
        if use_gpus:
            _check_gpus(nodes, local=self.hostfile is None)
        result = self._train(model, data, nodes, [f"train.device={'cuda' if use_gpus else 'cpu'}"])
        result["device"] = device
        return result


def _check_gpus(nodes: int, local: bool) -> None:
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible == 0:
        raise ConfigError(
            "use_gpus=True, but this machine has no GPU that torch can use (torch.cuda.is_available() is "
            f"False; torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}). Train on CPU "
            "ranks with use_gpus=False, or run on a machine with NVIDIA GPUs and a CUDA build of torch."
        )
    if local and nodes > visible:
        raise ConfigError(
            f"use_gpus=True with nodes={nodes}: one process per GPU needs {nodes} GPUs, and this machine has "
            f"{visible} visible. Pass nodes={visible} or fewer, or a hostfile for several machines."
        )
