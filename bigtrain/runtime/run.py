"""One rank's run, from a validated config to a result: build everything it needs, train, and tear
it all down whatever happens, so that a failure in the in-process API leaves no process group,
watchdog thread or open file behind.

    build:    process group, run dir and log, watchdog, resume point, DeepSpeed config, model,
              data, engine, checkpoint load, metrics
    train:    Trainer.train (bigtrain/runtime/trainer.py)
    teardown: metrics, watchdog, engine, process groups, process-wide state
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from bigtrain.config.derived import resolve_device
from bigtrain.distributed.process_group import select_accelerator
from bigtrain.errors import BigtrainError, PeerLostError
from bigtrain.runtime.rundir import write_config

log = logging.getLogger("bigtrain")


@dataclass
class TrainResult:
    """What a run gives back to the Python API (bigtrain/api/)."""

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


def run(cfg: DictConfig) -> TrainResult:
    """Train a composed, validated config in this process (one rank of the job). Raises a
    BigtrainError (bigtrain/errors.py) for a run that cannot go on; it is logged to train.log first."""
    session = Run(cfg)
    try:
        return session.train()
    except BigtrainError as err:
        log.error("%s", err)
        raise
    finally:
        session.close()


class Run:
    """What one rank builds for a run, kept so that `close` can release all of it."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.device = resolve_device(cfg)
        self.ranks = self.grid = self.run_dir = None
        self.watchdog = self.checkpointer = self.engine = self.metrics = None
        self.locks = []
        self.sequence = None  # the run's Ulysses sequence groups (parallel.sequence > 1)
        self.owns_process_group = False
        self.peer_lost = False

    # ------------------------------------------------------------------------------------- build

    def train(self) -> TrainResult:
        from bigtrain.runtime.trainer import Trainer

        cfg = self.cfg
        self._join_process_group()
        self._claim_run_dir()
        resume = self._in_phase("loading checkpoint", self.checkpointer.find_resume_point)
        if self.ranks.is_main:  # once the run is known to go ahead: a refused resume leaves it as it was
            write_config(cfg)
        ds_config = self._deepspeed_config(resume)
        flops, model = self._build_model(ds_config)
        loader = self._in_phase("preparing data", self._build_loader)
        self.engine = self._in_phase("starting", lambda: self._build_engine(model, ds_config))
        start_step, samples_seen = self._load(resume)
        loader.plan.start_step, loader.plan.start_sample = start_step, samples_seen
        self.metrics = self._open_metrics(start_step) if self.ranks.is_main else None
        pipeline_loss = getattr(self.engine.module, "loss_fn", None) if cfg.parallel.pipeline > 1 else None
        trainer = Trainer(
            cfg, self.engine, loader, self.checkpointer, self.metrics, grid=self.grid, flops_per_token=flops,
            device=self.device, watchdog=self.watchdog, exchange=self._gradient_exchange(),
            evaluator=self._build_evaluator(pipeline_loss), pipeline_loss=pipeline_loss, sequence=self.sequence,
        )
        self._enter_phase("training", start_step)
        if start_step >= cfg.train.max_steps:
            log.info("run already complete at step %d (train.max_steps=%d)", start_step, cfg.train.max_steps)
        outcome = self._train(trainer, start_step)
        return self._result(outcome)

    def _join_process_group(self) -> None:
        import torch.distributed as dist

        from bigtrain.distributed.process_group import init_distributed
        from bigtrain.distributed.topology import ProcessGrid

        # With optimizer offload (to CPU memory or NVMe) DeepSpeed's CPU Adam takes the optimizer step.
        select_accelerator(self.device, optimizer_on_cpu=self.cfg.offload.optimizer != "none")
        _remember_deepspeed_groups()
        self.owns_process_group = not dist.is_initialized()
        self.ranks = init_distributed(self.cfg.fault.collective_timeout_s)
        if self.device == "cuda":  # this run's peak, not an earlier in-process run's
            import torch

            torch.cuda.reset_peak_memory_stats()
        self.grid = ProcessGrid.of(self.cfg, self.ranks.world_size)

    def _claim_run_dir(self) -> None:
        """Rank 0 locks the run dir (and a checkpoint dir outside it) before any rank writes there; a
        second job on the same folders stops here, all of its ranks, having written nothing."""
        from bigtrain.components.checkpoint.checkpointer import Checkpointer
        from bigtrain.components.checkpoint.store import checkpoint_dir
        from bigtrain.distributed.process_group import decided_by_rank0
        from bigtrain.runtime.rundir import setup_logging
        from bigtrain.runtime.watchdog import Watchdog

        cfg, ranks = self.cfg, self.ranks
        self.run_dir = Path(cfg.run_dir)
        ckpt_dir = checkpoint_dir(cfg)
        folders = [(self.run_dir, "run_dir")] + ([] if ckpt_dir.is_relative_to(self.run_dir) else
                                                 [(ckpt_dir, "checkpoint.dir")])
        job = decided_by_rank0(lambda: self._lock(folders))
        setup_logging(self.run_dir, ranks.is_main, cfg.logging.deepspeed_level)
        log.info("run dir %s, %d rank(s) on %s (%s)", self.run_dir, ranks.world_size, self.device,
                 self.grid.describe())
        if cfg.fault.hang_timeout_s > 0:
            self.watchdog = Watchdog(self.run_dir, ranks.rank, ranks.world_size, cfg.fault.hang_timeout_s, job)
            self.watchdog.start()
        self.checkpointer = Checkpointer(self.cfg, ranks.rank, self.grid)

    def _lock(self, folders: list[tuple[Path, str]]) -> str:
        """Lock `folders` (rank 0); the job's token, which tells its heartbeats from another job's."""
        import uuid

        from bigtrain.runtime.rundir import FolderLock

        for folder, key in folders:
            lock = FolderLock(folder, key)
            lock.acquire()
            self.locks.append(lock)
        return uuid.uuid4().hex

    def _deepspeed_config(self, resume) -> dict:
        from bigtrain.config.deepspeed import to_deepspeed_config
        from bigtrain.runtime.rundir import write_ds_config

        ds_config = to_deepspeed_config(self.cfg, self.ranks.world_size)
        if resume is not None and resume.universal_path:
            ds_config["checkpoint"] = {"load_universal": True}
        write_ds_config(self.run_dir, ds_config, self.ranks.is_main)
        return ds_config

    def _build_model(self, ds_config: dict):
        """(training FLOPs per token, the model)."""
        from bigtrain.components import lora
        from bigtrain.components.models import build_model, model_shape, special_token_ids
        from bigtrain.monitor.metrics import flops_per_token

        cfg = self.cfg
        shape = model_shape(cfg.model)
        flops = flops_per_token(shape.matmul_parameters, shape.num_layers, shape.hidden_size, cfg.train.seq_len)
        log.info("model %s: %.1fM parameters", cfg.model.name, shape.parameters / 1e6)
        model = build_model(cfg.model, cfg.seed, ds_config, special_token_ids(cfg.data.tokenizer))
        return flops, self._apply_memory_levers(lora.wrap(model, cfg.model))

    def _apply_memory_levers(self, model):
        """Activation checkpointing and tiling on the whole-model layouts (a pipeline checkpoints its stages
        itself), then Ulysses' attention for a sequence-parallel run."""
        from bigtrain.distributed.tiling import tile_mlps

        train = self.cfg.train
        if train.activation_checkpointing == "full" and self.cfg.parallel.pipeline == 1:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False},
                                                 offload=train.activation_offload)
        if train.tiled_mlp > 1:
            tile_mlps(model, train.tiled_mlp)
        if self.cfg.parallel.sequence > 1:
            from bigtrain.distributed.sequence import SequenceParallel

            self.sequence = SequenceParallel(self.cfg, model)
        return model

    def _build_loader(self):
        from bigtrain.components.data.loader import BatchLoader, BatchPlan
        from bigtrain.components.data.sources import ensure_prepared, open_samples, training_sources

        cfg = self.cfg
        ensure_prepared(cfg, progress=self.ranks.is_main)
        sources = training_sources(cfg)
        plan = BatchPlan(micro_batch_size=cfg.train.micro_batch_size, grad_accum=cfg.train.grad_accum,
                         dp_size=self.grid.data, dp_rank=self.grid.data_rank(self.ranks.rank))
        return BatchLoader(open_samples(cfg, sources, "train"), [s.weight for s in sources], plan, cfg.seed,
                           names=[s.name for s in sources])

    def _build_evaluator(self, pipeline_loss):
        from bigtrain.components.data.loader import BatchLoader, BatchPlan
        from bigtrain.components.data.sources import evaluation_sources, open_samples
        from bigtrain.runtime.evaluator import Evaluator

        cfg = self.cfg
        if cfg.eval.interval == 0:
            return None
        sources = evaluation_sources(cfg)
        plan = BatchPlan(micro_batch_size=cfg.train.micro_batch_size, grad_accum=1, dp_size=self.grid.data,
                         dp_rank=self.grid.data_rank(self.ranks.rank))
        loader = BatchLoader(open_samples(cfg, sources, "validation"), [s.weight for s in sources], plan, cfg.seed,
                             names=[s.name for s in sources], allow_repeats=True)
        return Evaluator(self.engine, loader, cfg.eval.batches, replicas=self.grid.tensor, watchdog=self.watchdog,
                         pipeline_loss=pipeline_loss, sequence=self.sequence)

    def _build_engine(self, model, ds_config: dict):
        from bigtrain.runtime.engine import build_engine

        engine = build_engine(model, ds_config, self.cfg, mpu=self.sequence.mpu if self.sequence else None)
        self.checkpointer.attach(engine)
        return engine

    def _load(self, resume) -> tuple[int, int]:
        """(completed steps, samples consumed) at the resume point; (0, 0) for a fresh start."""
        if resume is None:
            return 0, 0
        client_state = self._in_phase("loading checkpoint", lambda: self.checkpointer.load(resume))
        return client_state["step"], client_state["samples_seen"]

    def _open_metrics(self, start_step: int):
        from bigtrain.monitor.metrics import MetricsWriter
        from bigtrain.monitor.peak import resolve_peak_tflops
        from bigtrain.monitor.sinks import WandbSink
        from bigtrain.monitor.system import SystemStats

        cfg = self.cfg
        peak, source = resolve_peak_tflops(cfg.logging.peak_tflops, self.device, cfg.precision.name)
        log.info("MFU against a peak of %.3g TFLOP/s per device (%s)", peak, source)
        metrics = MetricsWriter(
            str(self.run_dir), self.engine.monitor, cfg.train.max_steps, cfg.logging.progress, start_step=start_step,
            peak_tflops=peak, world_size=self.ranks.world_size, system=SystemStats(self.device, self.ranks.local_rank),
            wandb=WandbSink(cfg, self.run_dir) if cfg.logging.wandb else None,
        )
        metrics.start_from(start_step)
        return metrics

    def _gradient_exchange(self):
        from bigtrain.comm import build_gradient_exchange

        return build_gradient_exchange(self.cfg, self.engine, self.ranks.world_size)

    def _in_phase(self, phase: str, action):
        """Run `action` with the watchdog told that this rank may keep the others waiting in `phase`."""
        self._enter_phase(phase)
        return action()

    def _enter_phase(self, phase: str, step: int | None = None) -> None:
        if self.watchdog is not None:
            self.watchdog.progress(step, phase)

    # ------------------------------------------------------------------------------------- train

    def _train(self, trainer, start_step: int):
        from bigtrain.distributed.process_group import is_peer_failure

        try:
            return trainer.train(start_step)
        except RuntimeError as err:
            if isinstance(err, BigtrainError) or not is_peer_failure(err):
                raise
            self.peer_lost = True
            raise PeerLostError(
                f"rank {self.ranks.rank}: a collective failed ({str(err).splitlines()[0]}): another rank died or "
                f"stopped answering within fault.collective_timeout_s={self.cfg.fault.collective_timeout_s:g} s. "
                "Relaunch to resume from the last checkpoint."
            ) from err

    def _result(self, outcome) -> TrainResult:
        from bigtrain.errors import PREEMPTED

        if not outcome.preempted:
            log.info("done: %d steps, final loss %s", outcome.completed_steps, outcome.final_loss)
        latest = self.checkpointer.latest()
        return TrainResult(
            final_loss=outcome.final_loss, steps=outcome.completed_steps, run_dir=str(self.run_dir),
            checkpoint=str(latest) if latest else None, exit_code=PREEMPTED if outcome.preempted else 0,
        )

    # ---------------------------------------------------------------------------------- teardown

    def close(self) -> None:
        """Release everything built so far, each part even if another fails to close. After a lost
        peer the process group is broken: the engine and the groups are left for the process exit."""
        steps = [
            ("metrics", self.metrics and self.metrics.close),
            ("watchdog", self.watchdog and self.watchdog.stop),
            ("sequence parallelism", self.sequence and self.sequence.close),
        ]
        if not self.peer_lost:
            steps.append(("engine", self.engine and self.engine.destroy))
            if self.owns_process_group:
                steps.append(("process groups", _destroy_process_groups))
        steps.append(("process state", _forget_process_state))
        steps += [("run dir lock", lock.release) for lock in self.locks]
        for name, action in steps:
            if not action:
                continue
            try:
                action()
            except Exception as err:  # noqa: BLE001 - teardown goes on; the run's own error matters more
                log.warning("closing the %s failed: %s", name, err)


def _destroy_process_groups() -> None:
    """Through DeepSpeed, which then forgets the groups it cached, so that another run in this
    process (the Python API, a sweep) starts clean; bigtrain's own long-wait group goes with them."""
    import deepspeed.comm

    from bigtrain.distributed.process_group import forget_long_wait_group

    deepspeed.comm.destroy_process_group()
    forget_long_wait_group()


def _forget_process_state() -> None:
    """Process-wide state a run leaves and the next must not inherit: transformers' ZeRO-3 switch,
    DeepSpeed's record of the run's parallel groups, and the run's log file."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    _restore_deepspeed_groups()
    from deepspeed.comm.comm import comms_logger

    comms_logger.__init__()  # its configuration came from this run's DeepSpeed config
    logger = logging.getLogger("bigtrain")
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)



# DeepSpeed keeps the parallel layout of the last engine in module globals (deepspeed.utils.groups: the
# model-parallel unit, the tensor-parallel mesh, its groups), and a later engine in the same process
# reads them: after a tensor-parallel run, a data-parallel one would think it is tensor-parallel. Their
# values from before the first run are put back after every run.
_pristine_groups: dict | None = None


def _remember_deepspeed_groups() -> None:
    global _pristine_groups
    if _pristine_groups is None:
        import copy

        from deepspeed.utils import groups

        _pristine_groups = {name: copy.copy(value) for name, value in vars(groups).items() if _is_group_state(name, value)}


def _restore_deepspeed_groups() -> None:
    if _pristine_groups:
        import copy

        from deepspeed.utils import groups

        for name, value in _pristine_groups.items():
            setattr(groups, name, copy.copy(value))


def _is_group_state(name: str, value) -> bool:
    state_name = name in ("mpu", "mesh_device") or (name.startswith("_") and name.lstrip("_").isupper())
    return state_name and (value is None or isinstance(value, (dict, list)))
