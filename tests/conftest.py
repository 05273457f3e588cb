"""Shared helpers: launch real bigtrain runs (one or more ranks), or train on the in-process rank
pool, and read what they wrote.

Tiers: a test that starts ranks (a launcher, the rank pool, an in-process training run) carries the
`multiprocess` marker, one that runs bigtrain's commands or launch scripts (as processes, or through
the commands' entry point in this process) the `commands` marker; `make test-fast` runs the others,
which start no process at all. The markers are enforced: the helpers that start ranks fail a test
without `multiprocess` (tests using the rank fixtures get it automatically), and a test in the fast
tier that starts a process fails.
"""

import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bigtrain.distributed.process_group import free_port

# The test workers run side by side on the cores, so the processes they start share them. An OpenMP
# thread that waits at a barrier spins by default; on shared cores that spinning takes the time the other
# processes need (measured here: a one-rank, two-thread run next to two busy processes used 28 CPU-s
# spinning, 17 CPU-s passive, and finished sooner). Passive waiting costs nothing on idle cores. Set
# before torch loads OpenMP, and inherited by every launched rank and pool process.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# Small, fast runs: 10 logged steps of the debug model (tiny_llama's layers and vocabulary at a fifth of
# its step time; a test's own `model=...` after FAST replaces it), at twice the default learning rate: its
# loss falls by 0.38-0.48 in 10 steps on 2 ranks, against under 0.2 at the default (tiny_llama's: over 0.5),
# while 3e-3 would amplify the rounding differences the parity tests bound, to 1.6e-3 in an exported
# model's logits. The held-out evaluation at the end reads 2 batches (its default 10 add a fifth to such a
# run's time).
FAST = ["model=debug_llama", "optimizer.lr=2e-3", "train.max_steps=10", "logging.interval=1", "scheduler.warmup_steps=2", "train.micro_batch_size=4", "train.seq_len=64",
        "eval.batches=2"]
# After FAST, for a test whose premise is tiny_llama itself: the bytes its gradients make, a checkpoint
# that fills a small disk, steps slow enough to signal a job between them.
TINY_LLAMA = ["model=tiny_llama", "optimizer.lr=1e-3"]


FAULT_INJECTION = str(Path(__file__).resolve().parent / "fault_injection.py")


def launcher_command(launcher: str, nproc: int, overrides: list[str], faults: list[str] | None = None) -> list[str]:
    """The command that starts `nproc` ranks of bigtrain under `launcher`; with `faults` (arguments of
    tests/fault_injection.py) the ranks run that test-only entry point instead."""
    entry = ["-m", "bigtrain.train"] if faults is None else [FAULT_INJECTION, *faults]
    if launcher == "python":
        assert nproc == 1
        return [sys.executable, *entry, *overrides]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
                *entry, *overrides]
    if launcher == "deepspeed":
        entry = ["--module", "bigtrain.train"] if faults is None else entry
        return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()),
                *entry, *overrides]
    raise ValueError(launcher)


# ------------------------------------------------------------------------------ the test tiers

# Fixtures that start ranks: a test using one is in the multiprocess tier.
RANK_FIXTURES = {"_pools", "background", "rank_pool", "rank_pool1", "rank_pool4", "saved_run", "runs", "run", "net", "trained_run", "run_copy"}
_current_test: dict = {"item": None}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if RANK_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.multiprocess)


# --------------------------------------------------------------------- test workers (make test)

# Under pytest-xdist each file's tests run in one worker, which builds the file's module-scoped
# fixtures once; and the files that share a session-scoped resource run in one worker, which builds it
# once: the rank pools (a pool's processes pay for their start, the interpreters, imports and the first
# run's warm-up, in every worker that uses them) and shared_run's monitored run. A file is in the first
# group whose resource its text names: the files that use the 1- and 4-rank pools are one group, those
# that need only a 2-rank pool another, which starts a second one (one group of every pool file would
# be the longest unit by far).
SHARED_RESOURCES = {"rank_pools": re.compile(r"\brank_pool[14]\b|_pool\(_pools, nproc\)"),
                    "rank_pool": re.compile(r"\b(rank_pool|_pools)\b"),
                    "monitored_run": re.compile(r"\bmonitored_run\b")}


def shared_group(test_file: Path) -> str | None:
    text = test_file.read_text()
    return next((group for group, pattern in SHARED_RESOURCES.items() if pattern.search(text)), None)


# Handed out longest first (their time in a two-worker run, measured here), so that no long unit starts
# last and leaves a worker alone at the end; the short ones left, in-process tests mostly, fill the end.
LONGEST_FIRST = ["rank_pools",  # 244 s
                 "test_api.py", "test_plan.py", "rank_pool", "test_multinode.py",  # 181, 171, 169, 162 s
                 "test_benchmarks.py", "monitored_run", "test_validation.py",  # 96, 44, 41 s
                 "test_compression_benchmark.py", "test_sweep.py", "test_slurm_launcher.py", "test_data.py"]  # 16-31 s


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    groups = {path.name: shared_group(path) for path in Path(__file__).parent.glob("test_*.py")}

    class ByFileAndSharedResource(LoadScopeScheduling):
        ordered = False

        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return groups.get(Path(path).name) or path

        def _assign_work_unit(self, node) -> None:
            if not self.ordered:  # the queue is complete by the first assignment
                rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
                units = sorted(self.workqueue.items(), key=lambda unit: rank.get(Path(unit[0]).name, len(rank)))
                self.workqueue.clear()
                self.workqueue.update(units)
                self.ordered = True
            super()._assign_work_unit(node)

        def _reschedule(self, node) -> None:
            # xdist hands a worker its next unit once two of its tests are left; with units of a few long
            # tests that takes a unit from a worker about to be free. A worker needs only its last test
            # left (it runs a test once it knows the next), so the next unit goes out then.
            if node.shutting_down:
                return
            if not self.workqueue:
                node.shutdown()
            elif self._pending_of(self.assigned_work[node]) <= 1:
                self._assign_work_unit(node)

    return ByFileAndSharedResource(config, log)


_START_PROCESS = subprocess.Popen.__init__


def pytest_runtest_setup(item):
    _current_test["item"] = item  # before fixtures, module-scoped ones included, are set up
    # A test in the fast tier starts no process: one that does without a tier marker fails, saying so.
    in_fast_tier = not (item.get_closest_marker("multiprocess") or item.get_closest_marker("commands"))
    subprocess.Popen.__init__ = _refusing_processes(item) if in_fast_tier else _START_PROCESS


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item):
    subprocess.Popen.__init__ = _START_PROCESS


# What libraries run on their own to probe the machine (DeepSpeed compiles a test program and asks for
# ninja to see which ops can build; bigtrain asks nvidia-smi for GPUs): short, and not the test's doing.
MACHINE_PROBES = {"gcc", "cc", "c++", "g++", "ninja", "nvidia-smi", "nvcc"}


def _refusing_processes(item):
    def refuse(self, args, *rest, **kwargs):
        command = args if isinstance(args, str) else " ".join(map(str, args))
        if Path(command.split()[0]).name in MACHINE_PROBES:
            return _START_PROCESS(self, args, *rest, **kwargs)
        pytest.fail(f"{item.nodeid} runs `{command[:120]}` but is marked neither commands nor multiprocess; "
                    "mark it (@pytest.mark.commands) so that `make test-fast` leaves it out.")

    return refuse


def require_multiprocess_marker(what: str) -> None:
    """Fail the running test if it starts ranks without the marker that keeps it out of the fast tier."""
    item = _current_test["item"]
    if item is not None and item.get_closest_marker("multiprocess") is None:
        pytest.fail(f"{item.nodeid} {what} but is not marked multiprocess; mark it "
                    "(@pytest.mark.multiprocess) so that `make test-fast` leaves it out.")


# ------------------------------------------------------------------------------------ launches


def run_command(command: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a launcher in a session of its own; on timeout kill the whole session, ranks included,
    so that a stuck test cannot leave ranks loading the machine for the tests after it."""
    require_multiprocess_marker(f"runs {Path(command[0]).name}")
    env = dict(os.environ, PYTHONWARNINGS="ignore", DS_ACCELERATOR="cpu")
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {command}\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def run_bigtrain(launcher: str, nproc: int, overrides: list[str], cwd: Path, timeout: float = 300,
                 faults: list[str] | None = None):
    """Run bigtrain under a real launcher in `cwd`; fail the test with its output if it fails."""
    proc = run_command(launcher_command(launcher, nproc, overrides, faults), cwd, timeout)
    if proc.returncode != 0:
        pytest.fail(f"{launcher} run failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def bigtrain_in_process(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`bigtrain ARGS` through the command's entry point (bigtrain.cli.main) in this process: its exit
    code, stdout and stderr as a process would give them, without a fresh interpreter's imports. The
    entry point as a process is checked by the tests that run it that way (test_hosts, test_validation)."""
    import contextlib
    import io

    from bigtrain.cli import LOG_FORMAT, main

    out, err, before, environ = io.StringIO(), io.StringIO(), os.getcwd(), dict(os.environ)
    # The command's log lines go to its stderr (as a process's logging.basicConfig would send them,
    # which in here finds the test session's handlers already set and adds none).
    logger, handler = logging.getLogger("bigtrain"), logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
    except SystemExit as exit:  # argparse's refusals
        code = exit.code
    finally:  # what a command sets for itself (DS_ACCELERATOR) ends with it, as with a process
        os.chdir(before)
        os.environ.clear()
        os.environ.update(environ)
        logger.removeHandler(handler)
        logger.setLevel(level)
    return subprocess.CompletedProcess(["bigtrain", *map(str, args)], code, out.getvalue(), err.getvalue())


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]




@pytest.fixture
def background():
    """Start runs in the background (output to a log file); whatever is left is killed at the end."""
    started = []

    def start(command: list[str], cwd: Path, log_path: Path, **env_extra):
        require_multiprocess_marker(f"starts {Path(command[0]).name}")
        env = dict(os.environ, PYTHONWARNINGS="ignore", DS_ACCELERATOR="cpu", **env_extra)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for_step(run_dir: Path, step: int, proc, timeout: float = 180) -> None:
    """Block until metrics.jsonl shows `step` (or the process ended, or time ran out)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(json.loads(l)["step"] >= step for l in path.read_text().splitlines()):
            return
        if (code := proc.poll()) is not None:  # a process, or the rank pool
            pytest.fail(f"run ended (code {code}) before step {step}")
        time.sleep(0.2)
    pytest.fail(f"run did not reach step {step} in {timeout} s")


def rank_pids(launcher_pid: int) -> list[int]:
    """PIDs of the `bigtrain.train` rank processes under a launcher, indexed by rank."""
    import psutil

    children = psutil.Process(launcher_pid).children(recursive=True)
    ranks = [p for p in children if "bigtrain.train" in " ".join(p.cmdline()) and "RANK" in p.environ()]
    return [p.pid for p in sorted(ranks, key=lambda p: int(p.environ()["RANK"]))]


# ------------------------------------------------------------------------------ prepared data


@pytest.fixture(scope="session")
def blended_data(tmp_path_factory) -> list[str]:
    """Overrides that train on a 0.7 / 0.3 blend of the bundled corpus's two books, each prepared
    on its own by `prepare` (as `bigtrain prepare` does)."""
    from bigtrain.components.data.prepare import prepare
    from bigtrain.config import compose
    from bigtrain.config.compose import ASSET_DIR

    root = tmp_path_factory.mktemp("blend")
    for book in ("devils_dictionary", "jargon_file"):
        cfg = compose([f"data.files=[{ASSET_DIR / 'corpus' / book}.jsonl.gz]"])
        prepare(cfg.data, root / book, workers=1, validation_fraction=0.05, seed=0, progress=False)
    return ["data=prepared",
            f"data.sources=[{{path: {root / 'devils_dictionary'}, weight: 0.7}}, {{path: {root / 'jargon_file'}, weight: 0.3}}]"]


# ------------------------------------------------------------------------------- the rank pool


@pytest.fixture(scope="session")
def _pools():
    pools = {}
    yield pools
    for pool in pools.values():
        pool.close()


def _pool(pools: dict, world_size: int):
    from rank_pool import RankPool

    require_multiprocess_marker("uses the rank pool")
    if world_size not in pools or pools[world_size].broken:
        pools[world_size] = RankPool(world_size)
    return pools[world_size]


@pytest.fixture
def rank_pool(_pools):
    """Two ranks in one gloo process group, kept for the session (tests/rank_pool.py)."""
    return _pool(_pools, 2)


@pytest.fixture
def rank_pool1(_pools):
    """One rank in a process of its own (a one-process run next to the others)."""
    return _pool(_pools, 1)


@pytest.fixture
def rank_pool4(_pools):
    """Four ranks, for layouts with two axes (data x sequence, data x pipeline)."""
    return _pool(_pools, 4)


def pool_train(overrides: list[str]) -> dict:
    """On every rank of the pool: compose, validate and run `overrides` as bigtrain.train would; rank
    0 returns what the run wrote (its metrics records and the result), the others None."""
    import torch.distributed as dist

    from bigtrain.config import compose
    from bigtrain.config.validate import validate
    from bigtrain.runtime.run import run

    cfg = compose(overrides)
    validate(cfg, dist.get_world_size())
    result = run(cfg)
    if dist.get_rank() != 0:
        return None
    return {"exit_code": result.exit_code, "steps": result.steps, "checkpoint": result.checkpoint,
            "metrics": read_metrics(Path(result.run_dir))}


def pool_main(argv: list[str]) -> tuple[int, str]:
    """On every rank of the pool: bigtrain.train's entry point, `main(argv)`, as a launched rank runs
    it; (its exit code, what it wrote to stderr). For runs that end in a refusal or a one-process
    resume, where a launch would spend its time starting the interpreter."""
    import contextlib
    import io

    from bigtrain.train import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):  # the run's console log follows sys.stderr
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def train_on_pool(pool, overrides: list[str]) -> list[dict]:
    """Train `overrides` on the pool's ranks; the run's metrics records."""
    return pool.run(pool_train, overrides)[0]["metrics"]
