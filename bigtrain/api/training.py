"""Train from Python: `bigtrain.fit(...)` in this process or on several launched ranks.

    import bigtrain
    result = bigtrain.fit(["train.max_steps=50"])            # one process, this one
    result = bigtrain.fit(["zero=stage3"], nproc=2)           # two ranks under the deepspeed launcher
    cfg = bigtrain.compose(["model=tiny_gpt2"]); cfg.train.max_steps = 20
    result = bigtrain.fit(config=cfg)

Nothing heavy is imported until a run starts.
"""

import os
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bigtrain.config import compose as _compose
from bigtrain.config.derived import resolve_device
from bigtrain.config.overrides import config_to_overrides, format_value
from bigtrain.config.validate import validate
from bigtrain.errors import BigtrainError, ConfigError, exit_code_of, meaning
from bigtrain.runtime.run import TrainResult

LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The composed config for `overrides`, to inspect or edit before `fit(config=...)`."""
    return _compose(list(overrides))


def fit(
    overrides: list[str] | None = None,
    config: DictConfig | dict | None = None,
    *,
    nproc: int = 1,
    launcher: str = "deepspeed",
    quiet: bool = False,
) -> TrainResult:
    """Train and return a TrainResult (final_loss, steps, run_dir, checkpoint, metrics, exit_code).

    `config` is either a whole config from `bigtrain.compose` (edited or not), trained as it is, or
    a dict of keys applied on top of `overrides`. With nproc=1 the run trains in this process; with
    more it launches `nproc` ranks on this machine (`launcher`: deepspeed or torchrun) and waits for
    them. A config that cannot work raises ConfigError before anything starts; a run that fails
    returns its exit_code (result.ok is False).
    """
    overrides = list(overrides or [])
    if isinstance(config, DictConfig):
        if overrides:
            raise ConfigError("fit() takes overrides or a composed config, not both: compose the config with the "
                              "overrides (bigtrain.compose([...])), edit it, and pass it alone as config=.")
        cfg = config.copy()  # its groups (model=tiny_gpt2) are already in it: merging onto defaults would mix two
    else:
        cfg = _compose(overrides)
        if config is not None:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(config))
    if config is not None and nproc > 1:
        overrides = config_to_overrides(overrides, cfg)
    validate(cfg, nproc)
    if nproc == 1:
        return train_here(cfg)
    on_gpu = resolve_device(cfg) == "cuda"
    return launch(cfg, launch_command(launcher, nproc, with_run_dir(overrides, cfg), on_gpu=on_gpu), quiet)


def train_here(cfg: DictConfig) -> TrainResult:
    """One rank in this process, with a process group of its own on a fresh port; the environment is
    put back afterwards, so runs can follow each other. A run that cannot go on returns its exit code;
    a config problem found once it started (an incompatible checkpoint) raises ConfigError."""
    from bigtrain.distributed.process_group import free_port
    from bigtrain.runtime.run import run

    saved = {key: os.environ.get(key) for key in LAUNCHER_ENV}
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    try:
        result = run(cfg)
    except ConfigError:
        raise
    except BigtrainError as err:
        result = result_from_run_dir(Path(cfg.run_dir), cfg, exit_code_of(err))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    result.metrics = read_metrics(Path(result.run_dir))
    return result


def with_run_dir(overrides: list[str], cfg: DictConfig) -> list[str]:
    """`overrides` naming the run dir explicitly: every launched rank must write to the same one."""
    if any(o.startswith("run_dir=") for o in overrides):
        return overrides
    return [*overrides, f"run_dir={format_value(cfg.run_dir)}"]  # quoted: a default name holds = and ,


def launch(cfg: DictConfig, command: list[str], quiet: bool = False) -> TrainResult:
    """Run a launcher `command` that starts the ranks of `cfg` and wait for it; its output goes to
    run_dir/launch.log (and here unless `quiet`)."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}  # a launcher sets these for its ranks
    with open(run_dir / "launch.log", "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, start_new_session=True)
        for line in proc.stdout:
            log.write(line)
            if not quiet:
                print(line, end="", flush=True)
        code = proc.wait()
    result = result_from_run_dir(run_dir, cfg, code)
    result.command = command
    return result


def result_from_run_dir(run_dir: Path, cfg: DictConfig, code: int) -> TrainResult:
    """What a run that ended with `code` left behind, read from its run dir."""
    from bigtrain.components.checkpoint.store import checkpoint_dir, read_latest

    records = read_metrics(run_dir)
    latest = read_latest(checkpoint_dir(cfg))  # checkpoint.dir may lie outside the run dir
    return TrainResult(
        final_loss=records[-1]["loss"] if records else None,
        steps=records[-1]["step"] if records else 0,
        run_dir=str(run_dir),
        checkpoint=str(latest) if latest else None,
        exit_code=code,
        metrics=records,
    )


def launch_command(launcher: str, nproc: int, overrides: list[str], port: int | None = None,
                   on_gpu: bool = False) -> list[str]:
    from bigtrain.distributed.process_group import free_port

    port = port or free_port()
    bin_dir = Path(sys.executable).parent
    if launcher == "deepspeed":
        return [str(bin_dir / "deepspeed"), *deepspeed_devices(nproc, on_gpu), "--master_port", str(port),
                "--module", "bigtrain.train", *overrides]
    if launcher == "torchrun":
        return [str(bin_dir / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(port),
                "-m", "bigtrain.train", *overrides]
    raise ConfigError(f"launcher={launcher!r} is not a launcher bigtrain knows. Use deepspeed or torchrun.")


def deepspeed_devices(nproc: int, on_gpu: bool) -> list[str]:
    """The deepspeed launcher's device arguments for `nproc` ranks on this machine. With
    CUDA_VISIBLE_DEVICES set, the first `nproc` GPUs it lists (`--include`): given `--num_gpus` the
    launcher takes GPUs 0..N-1, other users' on a shared node, whatever is visible."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not on_gpu or visible is None:
        return ["--num_gpus", str(nproc)]
    ids = [entry.strip() for entry in visible.split(",") if entry.strip()]
    if not all(entry.isdigit() for entry in ids):
        raise ConfigError(
            f"CUDA_VISIBLE_DEVICES={visible} names GPUs by UUID or MIG instance, which the deepspeed launcher "
            "cannot pass on. Use launcher='torchrun', which keeps CUDA_VISIBLE_DEVICES as it is."
        )
    if nproc > len(ids):
        raise ConfigError(f"nproc={nproc} ranks need {nproc} GPUs; CUDA_VISIBLE_DEVICES={visible} makes {len(ids)} visible.")
    return ["--include", f"localhost:{','.join(ids[:nproc])}"]


def read_metrics(run_dir: Path) -> list[dict]:
    from bigtrain.monitor.metrics import read_records

    return read_records(run_dir / "metrics.jsonl")[0]


def describe_exit(code: int, run_dir: str) -> str:
    return f"failed (exit code {code}: {meaning(code)}; see {run_dir}/launch.log)"
