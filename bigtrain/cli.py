"""The `bigtrain` command: check a configuration or a multi-node launch, plan memory, report on and
sample from a run, sweep, export a trained model.

    bigtrain config [--world-size N] [--show yaml|deepspeed] [OVERRIDES...]
    bigtrain hosts [--no-ssh] [--ssh-port P] [--node-rank R] [--master-addr A] HOSTFILE [OVERRIDES...]
    bigtrain plan [--ranks N] [--device-memory GB] [--cpu-memory GB] [--nvme GB] ... [OVERRIDES...]
    bigtrain report RUN_DIR [--out DIR]
    bigtrain sample RUN_DIR --prompt TEXT [--max-new-tokens N] [--temperature T]
    bigtrain sweep [HYDRA OVERRIDES AND SWEEPS...]
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
    plan = commands.add_parser(
        "plan", help="estimate per-rank memory of every ZeRO stage and offload for a layout and hardware"
    )
    add_plan_arguments(plan)
    reporter = commands.add_parser("report", help="loss and throughput curves (PNG, HTML) and a run summary")
    reporter.add_argument("run_dir", help="the run's folder (holds metrics.jsonl)")
    reporter.add_argument("--out", help="folder for report.png, report.html, summary.json (default: the run dir)")
    sampler = commands.add_parser("sample", help="continue a prompt with a run's newest checkpoint")
    sampler.add_argument("run_dir", help="the run's folder (holds config.yaml and checkpoints/)")
    sampler.add_argument("--prompt", required=True, help="text for the model to continue")
    sampler.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate (default 40)")
    sampler.add_argument("--temperature", type=float, default=0.0,
                         help="0 (default): greedy, the most likely token each time; above 0: sampled")
    sampler.add_argument("--seed", type=int, default=0, help="seed for sampling (default 0)")
    sampler.add_argument("--checkpoint", help="a step_* folder (default: the newest valid checkpoint)")
    sweeper = commands.add_parser(
        "sweep", help="Hydra multirun: grid search, or Bayesian search with hydra/sweeper=optuna"
    )
    sweeper.add_argument("args", nargs=argparse.REMAINDER,
                         help="Hydra overrides and sweeps, e.g. optimizer.lr=1e-3,3e-3 (see bigtrain/sweep.py)")
    args = parser.parse_args(argv)
    if args.command == "sweep":
        from bigtrain.sweep import main as sweep_main

        sweep_main(args.args)
        return 0
    if args.command == "plan":
        return plan_command(args)
    if args.command == "report":
        return report_command(args)
    if args.command == "sample":
        return sample_command(args)
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


def add_plan_arguments(plan: argparse.ArgumentParser) -> None:
    plan.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    plan.add_argument("--ranks-per-node", type=int,
                      help="processes per node: GPUs per node (default: this machine's GPUs, or 2 CPU ranks)")
    plan.add_argument("--device", choices=["cuda", "cpu"], help="what the ranks train on (default: this machine's)")
    plan.add_argument("--device-memory", type=float, help="GB of memory per GPU (default: this machine's)")
    plan.add_argument("--cpu-memory", type=float, help="GB of CPU RAM per node (default: this machine's)")
    plan.add_argument("--nvme", type=float, help="GB of NVMe per node for offload=nvme (default: none)")
    plan.add_argument("--baseline-gb", type=float,
                      help="a rank's memory before its model (default: imports measured now + runtime)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("overrides", nargs="*", help="Hydra overrides: model, parallel.*, train.*, precision ...")


def plan_command(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from bigtrain.plan import as_json, plan, process_baseline_gb, render, this_machine

    try:
        hardware = this_machine(args.device)
        hardware = replace(
            hardware, nodes=args.nodes, ranks_per_node=args.ranks_per_node or hardware.ranks_per_node,
            device_memory_gb=args.device_memory or hardware.device_memory_gb,
            cpu_memory_gb=args.cpu_memory or hardware.cpu_memory_gb, nvme_gb=args.nvme,
        )
        if hardware.device == "cuda" and not hardware.device_memory_gb:
            raise ConfigError("--device cuda needs the memory of one GPU: pass --device-memory GB (e.g. 80).")
        if hardware.nodes < 1 or hardware.ranks_per_node < 1:
            raise ConfigError(f"--nodes and --ranks-per-node must be at least 1, got {hardware.nodes} and "
                              f"{hardware.ranks_per_node}.")
        process_gb = process_baseline_gb(args.baseline_gb)
        cfg, facts, options = plan(args.overrides, hardware, process_gb)
    except ConfigError as err:
        print(f"bigtrain: plan error: {err}", file=sys.stderr)
        return 2
    print(as_json(cfg, facts, hardware, options, process_gb) if args.json
          else render(cfg, facts, hardware, options, process_gb, args.overrides))
    return 0


def report_command(args: argparse.Namespace) -> int:
    from bigtrain.report import report

    try:
        summary, png, page = report(args.run_dir, args.out)
    except ConfigError as err:
        print(f"bigtrain: report error: {err}", file=sys.stderr)
        return 2
    print("\n".join(summary.lines()))
    print(f"wrote {png}\nwrote {page}")
    return 0


def sample_command(args: argparse.Namespace) -> int:
    import logging

    from bigtrain.sample import sample

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        text = sample(args.run_dir, args.prompt, max_new_tokens=args.max_new_tokens, checkpoint=args.checkpoint,
                      temperature=args.temperature, seed=args.seed)
    except ConfigError as err:
        print(f"bigtrain: sample error: {err}", file=sys.stderr)
        return 2
    print(args.prompt + text)
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
