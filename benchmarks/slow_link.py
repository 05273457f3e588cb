"""Gradient compression where the network is the bottleneck: two "nodes" behind a slow link.

    sudo python -m benchmarks.slow_link                  # 100 Mbit/s, every option: about 8 min on a 2-core CPU
    sudo python -m benchmarks.slow_link --rate-mbit 1000 --steps 60

Two network namespaces joined by a veth pair whose each direction is capped with `tc` (a token
bucket, tests/netns.py), one rank in each, started by torchrun as two nodes that meet at node 0's
address; gloo's traffic crosses the capped link. Each option trains tiny_llama for --steps steps
from the same initialisation; the table gives the mean step time after the option's warm-up (the
compressed steps), the bytes each rank sends per step (comms logger) and the bytes that really
crossed the link during the run (the veth's counters, both directions, start-up included). Needs
root (namespaces). Results: benchmarks/results/slow_link-<date>.{json,md}.
"""

import argparse
import os
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

from benchmarks.compression import RESULTS, run_option
from benchmarks.throughput import _commit, _versions, write_result
from bigtrain.distributed.process_group import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from netns import namespace_problem, two_hosts  # noqa: E402  (the test suite's namespace helper)

WARMUP = 10  # uncompressed steps of the compressing options; step time is measured after them
OPTIONS = {
    "none": [],
    "fp16_reduce": ["comm=fp16_reduce"],
    "onebit": ["comm=onebit", f"comm.warmup_steps={WARMUP}"],
    "powersgd (rank 4)": ["comm=powersgd", f"comm.warmup_steps={WARMUP}"],
    "local_sgd (every 8 steps)": ["comm=local_sgd", f"comm.warmup_steps={WARMUP}"],
}

# One torchrun per namespace, one rank each; exits nonzero if either node failed.
PAIR_SCRIPT = """#!/bin/bash
node() {{
  ip netns exec "$1" env GLOO_SOCKET_IFNAME={interface} OMP_NUM_THREADS=1 \\
    {torchrun} --nnodes 2 --node_rank "$2" --nproc_per_node 1 --master_addr {master} --master_port {port} -m "${{@:3}}"
}}
node {ns0} 0 "$@" & first=$!
node {ns1} 1 "$@" & second=$!
wait $first; a=$?; wait $second; b=$?
exit $(( a | b ))
"""


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate-mbit", type=float, default=100.0)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--only", nargs="+", choices=list(OPTIONS))
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    problem = namespace_problem()
    if problem:
        raise SystemExit(f"slow-link benchmark: {problem}")

    workdir = Path(tempfile.mkdtemp(prefix="bigtrain-slowlink-"))
    torchrun = Path(sys.executable).parent / "torchrun"
    common = ["zero=stage0", f"train.max_steps={args.steps}"]
    rows = {}
    with two_hosts(workdir, ssh=False, rate_mbit=args.rate_mbit) as net:
        for label, overrides in OPTIONS.items():
            if args.only and label not in args.only:
                continue
            script = workdir / f"pair-{len(rows)}.sh"
            script.write_text(PAIR_SCRIPT.format(interface=net.interface, torchrun=torchrun, port=free_port(),
                                                 master=net.hosts[0].address, ns0=net.hosts[0].namespace,
                                                 ns1=net.hosts[1].namespace))
            before = net.link_bytes()
            compressed_after = WARMUP if any(o.startswith("comm.warmup_steps") for o in overrides) else 0
            row = run_option([*common, *overrides], ["bash", str(script)], workdir, compressed_after)
            row["link_bytes"] = net.link_bytes() - before
            row["step_time_s"] = _mean_step_time(row, WARMUP)
            row["overrides"] = overrides
            rows[label] = row
            print(f"{label}: {row['step_time_s'] * 1000:.0f} ms/step, {row['bytes_per_step'] / 1e6:.2f} MB/step, "
                  f"{row['link_bytes'] / 1e6:.0f} MB over the link", flush=True)
    base = rows.get("none")
    if base:
        for row in rows.values():
            row["speedup"] = base["step_time_s"] / row["step_time_s"]

    result = {
        "date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "versions": _versions(), "commit": _commit(), "rate_mbit": args.rate_mbit, "steps": args.steps,
        "warmup_steps": WARMUP, "common_overrides": common, "rows": rows,
    }
    print(markdown(result))
    write_result(args.out, f"slow_link-{result['date']}", result, markdown(result))
    return result


def _mean_step_time(row: dict, after: int) -> float:
    """Mean step time after `after` steps, from the run's own per-step times."""
    times = row["step_times"][after:] or row["step_times"]
    return sum(times) / len(times)


def markdown(r: dict) -> str:
    lines = [
        f"# Gradient compression on a slow link, {r['date']}", "",
        f"Machine: {r['machine']}. Commit {r['commit']}. {r['versions']}.",
        f"Two nodes (network namespaces, one rank each, 1 CPU thread each) joined by a veth link capped at "
        f"{r['rate_mbit']:g} Mbit/s each way with tc; torchrun on each node, gloo over the link. tiny_llama "
        f"(5.3M parameters), ZeRO-0, fp32, default batch, {r['steps']} steps. Step time: mean after step "
        f"{r['warmup_steps']} (the compressing options' uncompressed warm-up). Bytes / step: what each rank "
        "sends through the collectives after the warm-up (comms logger); over the link: the veth's counters "
        "for the whole run, both directions, warm-up and start-up included.", "",
        "| option | step time | speed-up vs none | bytes / step | over the link (whole run) | final loss |",
        "|---|---|---|---|---|---|",
    ]
    for label, row in r["rows"].items():
        speedup = f"{row['speedup']:.1f}x" if "speedup" in row else ""
        lines.append(f"| {label} | {row['step_time_s'] * 1000:.0f} ms | {speedup} | "
                     f"{row['bytes_per_step'] / 1e6:.2f} MB | {row['link_bytes'] / 1e6:.0f} MB | "
                     f"{row['final_loss']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
