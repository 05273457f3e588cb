"""The `bigtrain` command: check a configuration, export a trained model.

    bigtrain config [--world-size N] [--show yaml|deepspeed] [OVERRIDES...]
    bigtrain export RUN_DIR OUT_DIR [--checkpoint PATH]
"""

import argparse
import json
import sys

from omegaconf import OmegaConf

from bigtrain.config import ConfigError, compose
from bigtrain.config.validate import validate
from bigtrain.distributed import ranks_from_env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bigtrain", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    config = commands.add_parser(
        "config", help="compose and validate a config; print the DeepSpeed JSON derived from it"
    )
    config.add_argument(
        "--world-size", type=int, default=ranks_from_env().world_size,
        help="number of processes the run will have (default: $WORLD_SIZE or 1)",
    )
    config.add_argument(
        "--show", choices=["deepspeed", "yaml"], default="deepspeed",
        help="print the derived DeepSpeed config (default) or the composed bigtrain config",
    )
    config.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. zero=stage3 train.max_steps=50")
    exporter = commands.add_parser(
        "export", help="write a run's checkpoint as a Hugging Face model folder (any ZeRO stage)"
    )
    exporter.add_argument("run_dir", help="the run's folder (holds config.yaml and checkpoints/)")
    exporter.add_argument("out_dir", help="folder to write config.json, model.safetensors, tokenizer")
    exporter.add_argument("--checkpoint", help="a step_* folder (default: the newest valid checkpoint)")
    args = parser.parse_args(argv)
    if args.command == "export":
        return export_command(args)
    return config_command(args)


def export_command(args: argparse.Namespace) -> int:
    import logging

    from bigtrain.export import export

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = export(args.run_dir, args.out_dir, args.checkpoint)
    except ConfigError as err:
        print(f"bigtrain: export error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


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
