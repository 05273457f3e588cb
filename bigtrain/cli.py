"""The `bigtrain` command: check a configuration or a multi-node launch, export a trained model.

    bigtrain config [--world-size N] [--show yaml|deepspeed] [OVERRIDES...]
    bigtrain hosts [--no-ssh] [--ssh-port P] [--node-rank R] [--master-addr A] HOSTFILE [OVERRIDES...]
    bigtrain export RUN_DIR OUT_DIR [--checkpoint PATH]
"""

import argparse
import json
import os
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
    hosts = commands.add_parser(
        "hosts", help="check a hostfile and the hosts before a multi-node launch (launchers/multinode.sh)"
    )
    hosts.add_argument("hostfile", help="one node per line: HOSTNAME slots=N")
    hosts.add_argument("--no-ssh", action="store_true",
                       help="per-node launch: skip the ssh check (launchers/node.sh)")
    hosts.add_argument("--ssh-port", type=int, help="sshd port on the hosts (default: ssh's own)")
    hosts.add_argument("--ssh-timeout", type=float, default=5.0,
                       help="seconds each host gets to answer over ssh (default 5)")
    hosts.add_argument("--node-rank", type=int, help="per-node launch: this node's position in the hostfile")
    hosts.add_argument("--master-addr", help="address of node 0 the ranks will meet at")
    hosts.add_argument("overrides", nargs="*", help="the run's Hydra overrides, checked against the slots")
    exporter = commands.add_parser(
        "export", help="write a run's checkpoint as a Hugging Face model folder (any ZeRO stage)"
    )
    exporter.add_argument("run_dir", help="the run's folder (holds config.yaml and checkpoints/)")
    exporter.add_argument("out_dir", help="folder to write config.json, model.safetensors, tokenizer")
    exporter.add_argument("--checkpoint", help="a step_* folder (default: the newest valid checkpoint)")
    args = parser.parse_args(argv)
    if args.command == "export":
        return export_command(args)
    if args.command == "hosts":
        return hosts_command(args)
    return config_command(args)


def hosts_command(args: argparse.Namespace) -> int:
    from bigtrain.hosts import check_launch

    try:
        hosts = check_launch(
            args.hostfile, args.overrides, ssh=not args.no_ssh, ssh_port=args.ssh_port,
            # the options pdsh will give ssh, so the check logs in the way the launch will
            ssh_options=os.environ.get("PDSH_SSH_ARGS_APPEND", ""), ssh_timeout_s=args.ssh_timeout,
            node_rank=args.node_rank, master_addr=args.master_addr,
        )
    except ConfigError as err:
        print(f"bigtrain: launch check failed: {err}", file=sys.stderr)
        return 2
    reached = "" if args.no_ssh else ", all reachable over ssh"
    layout = ", ".join(f"{h.name} x{h.slots}" for h in hosts)
    print(f"{len(hosts)} hosts, {sum(h.slots for h in hosts)} processes ({layout}){reached}")
    return 0


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
