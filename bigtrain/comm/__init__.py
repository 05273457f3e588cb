"""Data-parallel gradient communication: byte counting for every run, and bigtrain's compressed
exchanges (onebit, powersgd, local_sgd) in place of DeepSpeed's all-reduce at ZeRO-0."""

from omegaconf import DictConfig

from bigtrain.comm.exchange import GradientExchange


def build_gradient_exchange(cfg: DictConfig, engine, world_size: int) -> GradientExchange:
    """The exchange `cfg.comm` asks for, attached to `engine` (built from the same config)."""
    from bigtrain.comm.wire import WireCounter

    comm = cfg.comm
    counter = WireCounter(world_size) if comm.count_bytes else None
    params = [p for p in engine.module.parameters() if p.requires_grad]
    method = None
    if comm.name == "onebit":
        from bigtrain.comm.onebit import OneBitExchange

        method = OneBitExchange([p.numel() for p in params], world_size, comm.error_feedback, engine.device)
    elif comm.name == "powersgd":
        from bigtrain.comm.powersgd import PowerSGDExchange

        method = PowerSGDExchange([p.shape for p in params], comm.low_rank, world_size, comm.error_feedback,
                                  engine.device)
    elif comm.name == "local_sgd":
        from bigtrain.comm.local_sgd import LocalSGD

        method = LocalSGD(params, comm.sync_every, cfg.train.max_steps, world_size, comm.outer_optimizer,
                          comm.outer_lr, comm.outer_momentum)
    return GradientExchange(engine, method, comm.warmup_steps, counter)
