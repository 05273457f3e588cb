"""`bigtrain sweep`: search over bigtrain's config with Hydra's multirun. Every trial is a real
training run; its final metric (sweep.metric, default the loss) goes back to the sweeper.

    bigtrain sweep optimizer.lr=1e-3,3e-3 train.max_steps=50            grid: Hydra's basic sweeper
    bigtrain sweep hydra/sweeper=optuna hydra.sweeper.n_trials=8 \\
        'optimizer.lr=interval(1e-4,1e-2)' train.max_steps=50            Bayesian: Optuna's TPE sampler
    python -m bigtrain.tools.sweep -m ...                                      the same, without the CLI

Trials train in this process (one rank) or, with sweep.ranks=N, each under `deepspeed --num_gpus N`.
Each trial's run dir is <sweep dir>/<trial number>; <sweep dir>/results.jsonl lists every trial.
"""

import json
import logging
import math
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from bigtrain.config.compose import CONF_DIR, _register
from bigtrain.config.derived import resolve_device
from bigtrain.config.validate import validate
from bigtrain.errors import ConfigError

log = logging.getLogger("bigtrain-sweep")  # not under "bigtrain", whose handlers belong to each run

_register()  # bigtrain's schema and ${asset:} resolver, which conf/config.yaml uses


@hydra.main(config_path=str(CONF_DIR), config_name="sweep", version_base=None)
def trial(cfg: DictConfig) -> float:
    """One trial: train `cfg` and return its final `sweep.metric`."""
    from bigtrain.api.training import launch, launch_command, train_here

    hydra_cfg = HydraConfig.get()
    cfg.run_dir = hydra_cfg.runtime.output_dir
    OmegaConf.resolve(cfg)
    ranks = cfg.sweep.ranks
    try:
        validate(cfg, ranks)
        if ranks == 1:
            result = train_here(cfg)
        else:
            overrides = [*hydra_cfg.overrides.task, f"run_dir={cfg.run_dir}"]
            result = launch(cfg, launch_command("deepspeed", ranks, overrides, on_gpu=resolve_device(cfg) == "cuda"))
        value = _final(result.metrics, cfg.sweep.metric)
    except ConfigError as err:
        print(f"bigtrain: config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None  # a bad config is bad for every trial: end the sweep
    record = {"trial": hydra_cfg.job.num, "overrides": list(hydra_cfg.overrides.task), cfg.sweep.metric: value,
              "exit_code": result.exit_code, "run_dir": result.run_dir}
    with open(Path(hydra_cfg.sweep.dir) / "results.jsonl", "a") as results:
        results.write(json.dumps(record) + "\n")
    log.info("trial %d: %s = %s (%s)", hydra_cfg.job.num, cfg.sweep.metric, value, " ".join(record["overrides"]))
    return value


def _final(records: list[dict], metric: str) -> float:
    """The last logged value of `metric`; NaN when the run logged none (the sweeper counts it as failed)."""
    if records and metric not in records[-1]:
        raise ConfigError(f"sweep.metric={metric!r} is not a field of metrics.jsonl (fields: "
                          f"{', '.join(records[-1])}). Use one of those, e.g. loss or tokens_per_s.")
    values = [r[metric] for r in records if r.get(metric) is not None]
    return float(values[-1]) if values else math.nan


def main(argv: list[str] | None = None) -> None:
    """`bigtrain sweep ARGS`: `python -m bigtrain.tools.sweep -m ARGS` (a sweep is always a multirun)."""
    args = list(sys.argv[1:] if argv is None else argv)
    sys.argv = [sys.argv[0], *(args if {"-m", "--multirun"} & set(args) else ["-m", *args])]
    trial()


if __name__ == "__main__":
    trial()
