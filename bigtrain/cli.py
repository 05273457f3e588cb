"""The `bigtrain` command: inspect and check a configuration without starting a run.

    bigtrain config [--world-size N] [--show yaml|deepspeed] [OVERRIDES...]
"""

import argparse
import json
import sys

from omegaconf import OmegaConf

from bigtrain.config import ConfigError, compose
from bigtrain.config.validate import validate, world_size_from_env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bigtrain", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    config = commands.add_parser(
        "config", help="compose and validate a config; print the DeepSpeed JSON derived from it"
    )
    config.add_argument(
        "--world-size", type=int, default=world_size_from_env(),
        help="number of processes the run will have (default: $WORLD_SIZE or 1)",
    )
    config.add_argument(
        "--show", choices=["deepspeed", "yaml"], default="deepspeed",
        help="print the derived DeepSpeed config (default) or the composed bigtrain config",
    )
    config.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. zero=stage3 train.max_steps=50")
    args = parser.parse_args(argv)
    return config_command(args)


def config_command(args: argparse.Namespace) -> int:
    from bigtrain.config.deepspeed import to_deepspeed_config

    try:
        cfg = compose(args.overrides)
        validate(cfg, args.world_size)
    except ConfigError as err:
        print(f"bigtrain: config error: {err}", file=sys.stderr)
        return 2
    if args.show == "yaml":
        print(OmegaConf.to_yaml(cfg), end="")
    else:
        print(json.dumps(to_deepspeed_config(cfg, args.world_size), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
