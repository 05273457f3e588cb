"""bigtrain's entry point: compose -> validate -> build engine -> train -> close.

    python -m bigtrain.train [OVERRIDES]                          one process
    torchrun --nproc_per_node 2 -m bigtrain.train [OVERRIDES]
    deepspeed --num_gpus 2 --module bigtrain.train [OVERRIDES]

Exit codes: see bigtrain/exit_codes.py.
"""

import logging
import os
import sys
import types
from dataclasses import dataclass, field

from omegaconf import DictConfig

from bigtrain import exit_codes
from bigtrain.config import ConfigError, compose
from bigtrain.config.validate import resolve_device, validate
from bigtrain.distributed import ranks_from_env, select_accelerator

log = logging.getLogger("bigtrain")


@dataclass
class TrainResult:
    """What a run gives back to the Python API (bigtrain/api.py)."""

    final_loss: float | None
    steps: int
    run_dir: str
    checkpoint: str | None
    exit_code: int = 0
    metrics: list[dict] = field(default_factory=list)
    """The records of metrics.jsonl, one per logged step."""
    command: list[str] | None = None
    """The launch command, for runs started on several processes."""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def main(argv: list[str] | None = None) -> int:
    overrides = strip_launcher_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = compose(overrides)
        validate(cfg, ranks_from_env().world_size)
    except ConfigError as err:
        print(f"bigtrain: config error: {err}", file=sys.stderr)
        return exit_codes.CONFIG_ERROR
    return run(cfg).exit_code


def strip_launcher_args(args: list[str]) -> list[str]:
    """Drop the `--local_rank=N` that the deepspeed launcher appends; the rank is read from the env."""
    kept, skip_next = [], False
    for arg in args:
        if skip_next:
            skip_next = False
        elif arg in ("--local_rank", "--local-rank"):
            skip_next = True
        elif not arg.startswith(("--local_rank=", "--local-rank=")):
            kept.append(arg)
    return kept


def run(cfg: DictConfig) -> TrainResult:
    """Train a composed, validated config in this process (one rank of the job)."""
    device = resolve_device(cfg)
    select_accelerator(device)

    # Heavy imports only once the config is known to be good.
    import deepspeed.comm

    from bigtrain.checkpoint import CheckpointError, Checkpointer
    from bigtrain.comm import build_gradient_exchange
    from bigtrain.config.deepspeed import to_deepspeed_config
    from bigtrain.data import BatchLoader, BatchPlan, build_packed_dataset, rank_zero_first
    from bigtrain.distributed import init_distributed
    from bigtrain.engine import build_engine
    from bigtrain.metrics import MetricsWriter, flops_per_token
    from bigtrain.monitor.peak import resolve_peak_tflops
    from bigtrain.monitor.sinks import WandbSink
    from bigtrain.monitor.system import SystemStats
    from bigtrain.models import build_model, model_shape
    from bigtrain.parallel.topology import Layout
    from bigtrain.rundir import prepare_run_dir, setup_logging, write_ds_config
    from bigtrain.trainer import NonFiniteError, Trainer
    from bigtrain.watchdog import Watchdog

    ranks = init_distributed(cfg.fault.collective_timeout_s)
    layout = Layout.of(cfg, ranks.world_size)
    dp_size = layout.data
    run_dir = prepare_run_dir(cfg, ranks.is_main)
    setup_logging(run_dir, ranks.is_main, cfg.logging.deepspeed_level)
    log.info("run dir %s, %d rank(s) on %s (%s)", run_dir, ranks.world_size, device, layout.describe())
    watchdog = None
    if cfg.fault.hang_timeout_s > 0:
        watchdog = Watchdog(run_dir, ranks.rank, ranks.world_size, cfg.fault.hang_timeout_s)
        watchdog.start()

    checkpointer = Checkpointer(cfg, ranks.rank, layout)
    try:
        _phase(watchdog, "loading checkpoint")
        resume = checkpointer.find_resume_point()
    except (ConfigError, CheckpointError) as err:
        log.error("%s", err)
        raise SystemExit(exit_codes.CONFIG_ERROR) from None

    _phase(watchdog, "starting")
    ds_config = to_deepspeed_config(cfg, ranks.world_size)
    if resume is not None and resume.universal_path:
        ds_config["checkpoint"] = {"load_universal": True}
    write_ds_config(run_dir, ds_config, ranks.is_main)

    shape = model_shape(cfg.model)
    flops = flops_per_token(shape.matmul_parameters, shape.num_layers, shape.hidden_size, cfg.train.seq_len)
    log.info("model %s: %.1fM parameters", cfg.model.name, shape.parameters / 1e6)
    model = build_model(cfg.model, cfg.seed, ds_config)
    _phase(watchdog, "preparing data")
    try:
        with rank_zero_first():
            dataset = build_packed_dataset(cfg.data, cfg.train.seq_len)
        plan = BatchPlan(
            num_blocks=len(dataset),
            micro_batch_size=cfg.train.micro_batch_size,
            grad_accum=cfg.train.grad_accum,
            dp_size=dp_size,
            dp_rank=layout.data_rank(ranks.rank),
            seed=cfg.seed,
        )
    except ConfigError as err:  # found only once the data is read; every rank finds the same
        log.error("%s", err)
        raise SystemExit(exit_codes.CONFIG_ERROR) from None

    _phase(watchdog, "starting")
    engine = build_engine(model, ds_config, cfg)
    checkpointer.attach(engine)
    start_step, samples_seen = 0, 0
    if resume is not None:
        _phase(watchdog, "loading checkpoint")
        client_state = checkpointer.load(resume)
        start_step, samples_seen = client_state["step"], client_state["samples_seen"]
    plan.start_step, plan.start_sample = start_step, samples_seen
    metrics = None
    if ranks.is_main:
        peak, source = resolve_peak_tflops(cfg.logging.peak_tflops, device, cfg.precision.name)
        log.info("MFU against a peak of %.3g TFLOP/s per device (%s)", peak, source)
        metrics = MetricsWriter(
            str(run_dir), engine.monitor, cfg.train.max_steps, cfg.logging.progress, start_step=start_step,
            peak_tflops=peak, world_size=ranks.world_size, system=SystemStats(device, ranks.local_rank),
            wandb=WandbSink(cfg, run_dir) if cfg.logging.wandb else None,
        )
        metrics.drop_after(start_step)  # steps logged after the checkpoint will be trained again
    trainer = Trainer(
        engine,
        BatchLoader(dataset, plan),
        checkpointer,
        metrics,
        max_steps=cfg.train.max_steps,
        log_interval=cfg.logging.interval,
        seq_len=cfg.train.seq_len,
        flops_per_token=flops,
        device=device,
        max_nonfinite_steps=cfg.fault.max_nonfinite_steps,
        straggler_factor=cfg.fault.straggler_factor,
        watchdog=watchdog,
        exchange=build_gradient_exchange(cfg, engine, ranks.world_size),
        inject_nan_steps=list(cfg.fault.inject_nan_steps),
        inject_slow_rank=cfg.fault.inject_slow_rank,
        inject_slow_step_s=cfg.fault.inject_slow_step_s,
        inject_slow_save_s=cfg.fault.inject_slow_save_s,
        step_breakdown=cfg.logging.step_breakdown,
    )
    _phase(watchdog, "training", start_step)

    if start_step >= cfg.train.max_steps:
        log.info("run already complete at step %d (train.max_steps=%d)", start_step, cfg.train.max_steps)
    exit_code = 0
    try:
        outcome = trainer.train(start_step)
        if outcome.preempted:
            exit_code = exit_codes.PREEMPTED
        else:
            log.info("done: %d steps, final loss %s", outcome.completed_steps, outcome.final_loss)
    except NonFiniteError as err:
        log.error("%s", err)
        outcome, exit_code = None, exit_codes.NONFINITE
    except CheckpointError as err:
        log.error("%s", err)
        outcome, exit_code = None, exit_codes.CHECKPOINT_FAILED
    except RuntimeError as err:
        if not _is_peer_failure(err):
            raise
        log.error(
            "rank %d: a collective failed (%s): another rank died or stopped answering within "
            "fault.collective_timeout_s=%g s. Relaunch to resume from the last checkpoint.",
            ranks.rank, str(err).splitlines()[0], cfg.fault.collective_timeout_s,
        )
        os._exit(exit_codes.PEER_LOST)  # the process group is broken: no orderly shutdown is possible

    if metrics is not None:
        metrics.close()
    result = TrainResult(
        final_loss=outcome.final_loss if outcome else None,
        steps=outcome.completed_steps if outcome else start_step,
        run_dir=str(run_dir),
        checkpoint=str(checkpointer.latest()) if checkpointer.latest() else None,
        exit_code=exit_code,
    )
    if watchdog is not None:
        watchdog.stop()
    engine.destroy()
    # Through DeepSpeed, which then forgets the groups it cached, so that another run in this
    # process (the Python API, a sweep) starts clean.
    deepspeed.comm.destroy_process_group()
    return result


def _is_peer_failure(err: RuntimeError) -> bool:
    """A collective that failed because another rank is gone or silent (gloo reports these as plain
    RuntimeErrors: "Timed out waiting ... for recv", "Connection closed by peer")."""
    import torch.distributed

    text = str(err)
    return isinstance(err, torch.distributed.DistError) or any(
        marker in text for marker in ("gloo", "Gloo", "NCCL", "Connection closed by peer", "Timed out waiting")
    )


def _phase(watchdog, phase: str, step: int | None = None) -> None:
    if watchdog is not None:
        watchdog.progress(step, phase)


class _CallableModule(types.ModuleType):
    """`bigtrain.train(...)` is the Python API (bigtrain/api.py). Importing this module binds the name
    `bigtrain.train` to the module itself, so the module is made callable and forwards the call."""

    def __call__(self, overrides: list[str] | None = None, config=None, **kwargs) -> TrainResult:
        from bigtrain.api import train

        return train(overrides, config, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
