"""The `bigtrain` command: check a configuration or a multi-node launch, plan memory, report on and
sample from a run, sweep, export a trained model.

    bigtrain config [--world-size N] [--show yaml|deepspeed] [--device cuda|cpu] [OVERRIDES...]
    bigtrain prepare --out DIR [--workers N] [--validation-fraction F] [OVERRIDES...]
    bigtrain hosts [--no-ssh] [--ssh-port P] [--node-rank R] [--master-addr A] HOSTFILE [OVERRIDES...]
    bigtrain plan [--ranks N] [--device-memory GB] [--cpu-memory GB] [--nvme GB] ... [OVERRIDES...]
    bigtrain report RUN_DIR [--out DIR]
    bigtrain sample RUN_DIR --prompt TEXT [--max-new-tokens N] [--temperature T]
    bigtrain sweep [HYDRA OVERRIDES AND SWEEPS...]
    bigtrain export RUN_DIR OUT_DIR [--checkpoint PATH]

Every command refuses bad input with one paragraph on stderr and exit code 2, before heavy work.
"""

import argparse
import json
import logging
import os
import sys

from bigtrain.errors import ConfigError

# The log lines of the commands that load a checkpoint (sample, export), on stderr.
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bigtrain", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _, _) in COMMANDS.items():
        add_arguments(commands.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    if args.command in OFFLINE_TOOLS:  # they read files with DeepSpeed's code but use no accelerator
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _, _, command, failure = COMMANDS[args.command]
    try:
        return command(args)
    except ConfigError as err:
        print(f"bigtrain: {failure}: {err}", file=sys.stderr)
        return err.exit_code


# ---------------------------------------------------------------------------------------- config


def add_config_arguments(config: argparse.ArgumentParser) -> None:
    config.add_argument(
        "--world-size", type=int, help="number of processes the run will have (default: $WORLD_SIZE or 1)",
    )
    config.add_argument(
        "--device", choices=["cuda", "cpu"],
        help="check and derive the config for a machine of this kind rather than this one (e.g. --device cuda "
             "on a CPU-only machine shows what a GPU run would use)",
    )
    config.add_argument(
        "--show", choices=["deepspeed", "yaml"], default="deepspeed",
        help="print the derived DeepSpeed config (default) or the composed bigtrain config",
    )
    config.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. zero=stage3 train.max_steps=50")


def config_command(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from bigtrain.config import compose
    from bigtrain.config.deepspeed import to_deepspeed_config
    from bigtrain.config.validate import validate
    from bigtrain.distributed.process_group import ranks_from_env

    world_size = args.world_size if args.world_size is not None else ranks_from_env().world_size
    cfg = compose(args.overrides)
    if args.device:  # describing another machine: its device, and none of this machine's checks
        cfg.train.device = args.device
    validate(cfg, world_size, this_machine=args.device is None)
    if args.show == "yaml":
        print(OmegaConf.to_yaml(cfg), end="")
    else:
        print(json.dumps(to_deepspeed_config(cfg, world_size), indent=2))
    return 0


# --------------------------------------------------------------------------------------- prepare


def add_prepare_arguments(prepare: argparse.ArgumentParser) -> None:
    prepare.add_argument("--out", required=True, help="folder to write the prepared data to (data.sources of a run)")
    prepare.add_argument("--workers", type=int, default=0, help="tokenizer processes (default: one per core)")
    prepare.add_argument("--validation-fraction", type=float, default=0.02,
                         help="share of documents held out for evaluation, chosen by document (default 0.02)")
    prepare.add_argument("--seed", type=int, default=1234, help="seeds the choice of held-out documents")
    prepare.add_argument("--no-progress", action="store_true", help="no progress bar")
    prepare.add_argument("overrides", nargs="*",
                         help="the data group and keys of the source: data=hf data.files=[a.jsonl] data.format=chat ...")


def prepare_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bigtrain.components.data.prepare import prepare
    from bigtrain.config import compose

    if args.workers < 0:
        raise ConfigError(f"--workers must be 0 (one per core) or more, got {args.workers}.")
    cfg = compose(args.overrides)
    if cfg.data.sources:
        raise ConfigError("data=prepared reads folders that are already prepared; pass the source's data group "
                          "(data=hf data.files=[...], or data=bundled) to prepare one.")
    done = prepare(cfg.data, Path(args.out), workers=args.workers, validation_fraction=args.validation_fraction,
                   seed=args.seed, progress=not args.no_progress)
    meta = done.meta
    if done.up_to_date:
        print(f"{done.out} is up to date (same files, tokenizer and settings): nothing to do")
        return 0
    train, held_out = meta["splits"]["train"], meta["splits"]["validation"]
    tokens = train["tokens"] + held_out["tokens"]
    print(f"prepared {done.out}: {train['documents']:,} training documents ({train['tokens']:,} tokens), "
          f"{held_out['documents']:,} held out ({held_out['tokens']:,} tokens), {meta['dtype']} tokens "
          f"({Path(done.out, 'train.bin').stat().st_size / max(1, train['tokens']):.1f} bytes each), in "
          f"{meta['seconds']:.1f} s ({tokens / max(meta['seconds'], 1e-9):,.0f} tokens/s)")
    print(f"train on it with: data=prepared data.sources=[{done.out}]")
    return 0


# ----------------------------------------------------------------------------------------- hosts


def add_hosts_arguments(hosts: argparse.ArgumentParser) -> None:
    hosts.add_argument("hostfile", help="one node per line: HOSTNAME slots=N")
    hosts.add_argument("--no-ssh", action="store_true", help="per-node launch: skip the ssh check (launchers/node.sh)")
    hosts.add_argument("--ssh-port", type=int, help="sshd port on the hosts (default: ssh's own)")
    hosts.add_argument("--ssh-timeout", type=float, default=5.0,
                       help="seconds each host gets to answer over ssh (default 5)")
    hosts.add_argument("--node-rank", type=int, help="per-node launch: this node's position in the hostfile")
    hosts.add_argument("--master-addr", help="address of node 0 the ranks will meet at")
    hosts.add_argument("overrides", nargs="*", help="the run's Hydra overrides, checked against the slots")


def hosts_command(args: argparse.Namespace) -> int:
    from bigtrain.tools.hosts import check_launch

    hosts = check_launch(
        args.hostfile, args.overrides, ssh=not args.no_ssh, ssh_port=args.ssh_port,
        # the options pdsh will give ssh, so the check logs in the way the launch will
        ssh_options=os.environ.get("PDSH_SSH_ARGS_APPEND", ""), ssh_timeout_s=args.ssh_timeout,
        node_rank=args.node_rank, master_addr=args.master_addr,
    )
    reached = "" if args.no_ssh else ", all reachable over ssh"
    layout = ", ".join(f"{h.name} x{h.slots}" for h in hosts)
    print(f"{len(hosts)} hosts, {sum(h.slots for h in hosts)} processes ({layout}){reached}")
    return 0


# ------------------------------------------------------------------------------------------ plan


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

    from bigtrain.tools.plan import as_json, plan, process_baseline_gb, render, this_machine

    hardware = this_machine(args.device)
    hardware = replace(
        hardware, nodes=args.nodes, ranks_per_node=args.ranks_per_node or hardware.ranks_per_node,
        device_memory_gb=args.device_memory or hardware.device_memory_gb,
        cpu_memory_gb=args.cpu_memory or hardware.cpu_memory_gb, nvme_gb=args.nvme,
    )
    if hardware.device == "cuda" and not hardware.device_memory_gb:
        raise ConfigError("--device cuda needs the memory of one GPU: pass --device-memory GB (e.g. 80).")
    for flag, value in (("--device-memory", args.device_memory), ("--cpu-memory", args.cpu_memory), ("--nvme", args.nvme),
                        ("--baseline-gb", args.baseline_gb)):
        if value is not None and not value > 0:
            raise ConfigError(f"{flag} {value} is not an amount of memory: give a positive number of GB.")
    if hardware.nodes < 1 or hardware.ranks_per_node < 1:
        raise ConfigError(f"--nodes and --ranks-per-node must be at least 1, got {hardware.nodes} and "
                          f"{hardware.ranks_per_node}.")
    process_gb = process_baseline_gb(args.baseline_gb)
    cfg, facts, options = plan(args.overrides, hardware, process_gb)
    print(as_json(cfg, facts, hardware, options, process_gb) if args.json
          else render(cfg, facts, hardware, options, process_gb, args.overrides))
    return 0


# ----------------------------------------------------------------------- report, sample, export


def add_report_arguments(reporter: argparse.ArgumentParser) -> None:
    reporter.add_argument("run_dir", help="the run's folder (holds metrics.jsonl)")
    reporter.add_argument("--out", help="folder for report.png, report.html, summary.json (default: the run dir)")


def report_command(args: argparse.Namespace) -> int:
    from bigtrain.tools.report import report

    summary, png, page = report(args.run_dir, args.out)
    print("\n".join(summary.lines()))
    print(f"wrote {png}\nwrote {page}")
    return 0


def add_sample_arguments(sampler: argparse.ArgumentParser) -> None:
    sampler.add_argument("run_dir", help="the run's folder (holds config.yaml and checkpoints/)")
    sampler.add_argument("--prompt", required=True, help="text for the model to continue")
    sampler.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate (default 40)")
    sampler.add_argument("--temperature", type=float, default=0.0,
                         help="0 (default): greedy, the most likely token each time; above 0: sampled")
    sampler.add_argument("--seed", type=int, default=0, help="seed for sampling (default 0)")
    sampler.add_argument("--checkpoint", help="a step_* folder (default: the newest valid checkpoint)")


def sample_command(args: argparse.Namespace) -> int:
    from bigtrain.tools.sample import sample

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    text = sample(args.run_dir, args.prompt, max_new_tokens=args.max_new_tokens, checkpoint=args.checkpoint,
                  temperature=args.temperature, seed=args.seed)
    print(args.prompt + text)
    return 0


def add_export_arguments(exporter: argparse.ArgumentParser) -> None:
    exporter.add_argument("run_dir", help="the run's folder (holds config.yaml and checkpoints/)")
    exporter.add_argument("out_dir", help="folder to write config.json, model.safetensors, tokenizer")
    exporter.add_argument("--checkpoint", help="a step_* folder (default: the newest valid checkpoint)")
    exporter.add_argument("--overwrite", action="store_true",
                          help="replace OUT_DIR if it already holds files (default: refuse)")
    exporter.add_argument("--adapter", action="store_true",
                          help="a LoRA run: write the peft adapter alone (default: the merged model)")


def export_command(args: argparse.Namespace) -> int:
    from bigtrain.tools.export import export

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    print(export(args.run_dir, args.out_dir, args.checkpoint, overwrite=args.overwrite, adapter=args.adapter))
    return 0


# ----------------------------------------------------------------------------------------- sweep


def add_sweep_arguments(sweeper: argparse.ArgumentParser) -> None:
    sweeper.add_argument("args", nargs=argparse.REMAINDER,
                         help="Hydra overrides and sweeps, e.g. optimizer.lr=1e-3,3e-3 (see bigtrain/tools/sweep.py)")


def sweep_command(args: argparse.Namespace) -> int:
    from bigtrain.tools.sweep import main as sweep_main

    sweep_main(args.args)
    return 0


OFFLINE_TOOLS = ("prepare", "export", "sample", "report")
# name: (help, add_arguments, command, what a refusal is called)
COMMANDS = {
    "config": ("compose and validate a config; print the DeepSpeed JSON derived from it",
               add_config_arguments, config_command, "config error"),
    "prepare": ("tokenize a data source once into memory-mapped token files for data=prepared",
                add_prepare_arguments, prepare_command, "prepare error"),
    "hosts": ("check a hostfile and the hosts before a multi-node launch (launchers/multinode.sh)",
              add_hosts_arguments, hosts_command, "launch check failed"),
    "export": ("write a run's checkpoint as a Hugging Face model folder (any ZeRO stage)",
               add_export_arguments, export_command, "export error"),
    "plan": ("estimate per-rank memory of every ZeRO stage and offload for a layout and hardware",
             add_plan_arguments, plan_command, "plan error"),
    "report": ("loss and throughput curves (PNG, HTML) and a run summary",
               add_report_arguments, report_command, "report error"),
    "sample": ("continue a prompt with a run's newest checkpoint", add_sample_arguments, sample_command,
               "sample error"),
    "sweep": ("Hydra multirun: grid search, or Bayesian search with hydra/sweeper=optuna",
              add_sweep_arguments, sweep_command, "sweep error"),
}


if __name__ == "__main__":
    sys.exit(main())
