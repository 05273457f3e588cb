"""Issue 18 items the other test files leave open: broken inputs that must give one paragraph and exit 2
(a tokenizer folder of broken JSON, a malformed PDSH_SSH_ARGS_APPEND, a garbage or torn metrics.jsonl,
a broken config.yaml), data problems found by `bigtrain config` before any rank starts, restart.sh not
relaunching what a relaunch cannot fix, a payload checkpoint named explicitly (export/sample
--checkpoint, checkpoint.resume=PATH), the lock on a checkpoint dir outside the run dir, and the
overrides a rank reads from the environment. Nothing here starts a rank."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from bigtrain.cli import main as cli
from bigtrain.config import compose
from bigtrain.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def refusal(capsys, argv: list[str], words: str) -> str:
    """Run `bigtrain ARGV` through its entry point; it must exit 2 with one paragraph holding `words`."""
    code = cli(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert words in err, err
    assert err.startswith("bigtrain: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(autouse=True)
def offline_tools_env(monkeypatch):
    """The offline commands set DS_ACCELERATOR for themselves; keep that out of the other tests."""
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)


# -------------------------------------------------------------- 9. tracebacks become one paragraph


def test_a_tokenizer_folder_of_broken_json_is_one_paragraph(capsys, tmp_path):
    """Item 9: a tokenizer folder whose files are broken JSON is refused by name, not with a traceback."""
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "tokenizer.json").write_text('{"version": ')
    (folder / "tokenizer_config.json").write_text("{")
    refusal(capsys, ["config", f"data.tokenizer={folder}"], f"The tokenizer in '{folder}' cannot be loaded")


def test_malformed_ssh_options_are_one_paragraph_before_any_login(capsys, monkeypatch, tmp_path):
    """Item 9: PDSH_SSH_ARGS_APPEND that cannot be split into ssh options (an unclosed quote) is refused
    by `bigtrain hosts` before it tries any host."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    monkeypatch.setenv("PDSH_SSH_ARGS_APPEND", "-i ~/.ssh/key -o 'ProxyCommand=ssh gate")
    refusal(capsys, ["hosts", str(hostfile)], "PDSH_SSH_ARGS_APPEND=")


def write_metrics(run_dir: Path, tail: str) -> None:
    run_dir.mkdir()
    records = [{"step": s, "loss": 5.0 - s, "lr": 1e-3, "tokens_per_s": 1000.0, "step_time_s": 0.5, "mem_gb": 1.0}
               for s in (1, 2)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_report_on_garbage_metrics_is_one_paragraph_naming_the_line(capsys, tmp_path):
    """Item 9: `bigtrain report` on a metrics.jsonl with a line that is not a record refuses, naming it."""
    run = tmp_path / "run"
    write_metrics(run, "\x00\x01 not json\n" + json.dumps({"step": 3, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 1.0,
                                                          "step_time_s": 1.0, "mem_gb": 1.0}) + "\n")
    refusal(capsys, ["report", str(run)], "metrics.jsonl line 3 is not a step record")


def test_report_leaves_out_a_last_line_cut_short_by_a_crash(capsys, tmp_path):
    """Item 9: a crash mid-write leaves a partial last line; the report covers the records before it."""
    run = tmp_path / "run"
    write_metrics(run, '{"step": 3, "loss": 1.')
    assert cli(["report", str(run), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 2


@pytest.mark.parametrize("text", ["model: [unclosed\n  - x: {", "just a string\n"])
def test_export_of_a_run_with_a_broken_config_is_one_paragraph(capsys, tmp_path, text):
    """Item 9: `bigtrain export` of a run whose config.yaml is not YAML, or not a bigtrain config."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(text)
    refusal(capsys, ["export", str(run), str(tmp_path / "out")], "is not a readable bigtrain config")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------- 10. data, before launch


BAD_DATA = {
    "empty_file": (lambda p: p.write_text(""), "is empty"),
    "binary_file": (lambda p: p.write_bytes(bytes(range(256)) * 12), "is binary"),
    "a_folder": (lambda p: p.mkdir(), "is not a regular file"),
    "no_text_column": (lambda p: p.write_text('{"body": "hello"}\n'), "has no field 'text' (data.text_field)"),
    "malformed_json": (lambda p: p.write_text('{"text": "a"\n{{{\n'), "cannot be read by data.builder=json"),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_is_refused_by_bigtrain_config(capsys, tmp_path, case):
    """Item 10: `bigtrain config` (and every rank's start, which runs the same checks) refuses data that
    would fail only after launch: an empty, binary or malformed file, a folder, a missing text field."""
    make, words = BAD_DATA[case]
    path = tmp_path / "data.jsonl"
    make(path)
    refusal(capsys, ["config", "data=hf", "data.builder=json", f"data.files=[{path}]"], words)


def test_a_missing_split_is_refused_by_bigtrain_config(capsys, tmp_path):
    """Item 10: a split the data does not have (data.split) is refused before launch."""
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "hello"}\n')
    refusal(capsys, ["config", "data=hf", "data.builder=json", f"data.files=[{path}]", "data.split=validation"],
            "the split 'validation' exists (data.split)")


@pytest.mark.commands
@pytest.mark.parametrize("code,attempts", [(2, 1), (3, 1), (4, 1), (0, 1), (1, 3), (5, 3)])
def test_restart_wrapper_relaunches_only_what_a_relaunch_can_fix(tmp_path, code, attempts):
    """Item 10: launchers/restart.sh stops at once on 2 (bad config or data), 3 (non-finite) and 4 (disk),
    and on success; a crash (1) or a lost peer (5) is relaunched up to MAX_RESTARTS times."""
    count = tmp_path / "attempts"
    job = tmp_path / "job.sh"
    job.write_text(f"#!/bin/sh\necho run >> {count}\nexit {code}\n")
    job.chmod(0o755)
    proc = subprocess.run(["bash", str(REPO / "launchers" / "restart.sh"), str(job)], capture_output=True, text=True,
                          env={**os.environ, "MAX_RESTARTS": "2", "RESTART_DELAY_S": "0"}, timeout=60, check=False)
    assert proc.returncode == code
    assert len(count.read_text().splitlines()) == attempts, proc.stderr
    if code in (2, 3, 4):
        assert f"exit code {code} will not be fixed by relaunching" in proc.stderr


# ---------------------------------------------------------- 1. a payload checkpoint named by path


class Payload:
    """Unpickling this runs `touch MARKER`: the shape of a hostile checkpoint file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def payload_run(tmp_path):
    """A run dir with a checkpoint whose model-states file carries a payload, sealed in its manifest as an
    attacker able to write the folder would seal it."""
    from bigtrain.components.checkpoint.store import MANIFEST, sha256_of

    run = tmp_path / "run"
    tag = run / "checkpoints" / "step_00000001"
    tag.mkdir(parents=True)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(compose([f"run_dir={run}"])))
    name = "mp_rank_00_model_states.pt"
    torch.save({"module": Payload(tmp_path / "code_ran")}, tag / name)
    (tag / MANIFEST).write_text(json.dumps({"step": 1, "world_size": 1, "dp_size": 1, "zero_stage": 2, "files": {
        name: {"size": (tag / name).stat().st_size, "sha256": sha256_of(tag / name)}}}))
    return run, tag


def test_a_payload_checkpoint_named_explicitly_is_refused_with_nothing_run(capsys, tmp_path, payload_run):
    """Item 1: `export --checkpoint`, `sample --checkpoint` and checkpoint.resume=PATH refuse a checkpoint
    file that would run code when unpickled (exit 2); the payload never runs."""
    from bigtrain.components.checkpoint.checkpointer import Checkpointer
    from bigtrain.distributed.topology import ProcessGrid

    run, tag = payload_run
    words = "unpickling it could run code, so nothing was loaded from it"
    refusal(capsys, ["export", str(run), str(tmp_path / "out"), "--checkpoint", str(tag)], words)
    refusal(capsys, ["sample", str(run), "--prompt", "hi", "--checkpoint", str(tag)], words)
    cfg = compose([f"run_dir={tmp_path / 'resumed'}", f"checkpoint.resume={tag}"])
    with pytest.raises(ConfigError, match=words) as refused:
        Checkpointer(cfg, 0, ProcessGrid.of(cfg, 1))._choose()  # rank 0's resume decision
    assert refused.value.exit_code == 2
    assert not (tmp_path / "code_ran").exists(), "the payload ran"
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------- 3. a checkpoint dir of its own


@pytest.fixture
def one_rank_group():
    """A process group of one rank in this process (gloo, in-memory store) for rank 0's lock decision."""
    import torch.distributed as dist

    from bigtrain.distributed.process_group import forget_long_wait_group

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    forget_long_wait_group()
    dist.destroy_process_group()


def test_a_checkpoint_dir_outside_the_run_dir_is_locked_too(one_rank_group, tmp_path):
    """Item 3: a job locks its checkpoint.dir when it lies outside its run dir, so two jobs with separate
    run dirs but one checkpoint dir cannot prune or overwrite each other's checkpoints; the second job
    stops before writing anything there."""
    from bigtrain.distributed.process_group import Ranks
    from bigtrain.distributed.topology import ProcessGrid
    from bigtrain.runtime.run import Run
    from bigtrain.runtime.rundir import FolderLock

    shared = tmp_path / "shared_checkpoints"

    def start(run_dir: Path, checkpoint_dir: Path) -> Run:
        run = Run(compose([f"run_dir={run_dir}", f"checkpoint.dir={checkpoint_dir}", "fault.hang_timeout_s=0"]))
        run.ranks, run.grid = Ranks(rank=0, local_rank=0, world_size=1), ProcessGrid.of(run.cfg, 1)
        return run

    holder = FolderLock(shared, "checkpoint.dir")
    holder.acquire()
    second = start(tmp_path / "second", shared)
    try:
        with pytest.raises(ConfigError, match=f"{shared} is in use by another job"):
            second._claim_run_dir()
    finally:
        second.close()
        holder.release()
    assert sorted(p.name for p in shared.iterdir()) == [".lock"]

    first = start(tmp_path / "first", shared)
    try:
        first._claim_run_dir()
        assert sorted(lock.folder for lock in first.locks) == sorted([tmp_path / "first", shared])
    finally:
        first.close()
    inside = start(tmp_path / "third", Path("checkpoints"))  # relative: under the run dir, one lock covers both
    try:
        inside._claim_run_dir()
        assert [lock.folder for lock in inside.locks] == [tmp_path / "third"]
    finally:
        inside.close()


# ------------------------------------------------------------------- 7. overrides to every rank


def test_a_rank_reads_the_overrides_from_the_environment_byte_for_byte(capsys, monkeypatch, tmp_path):
    """Item 7: on a multi-node launch the overrides reach each rank through the env file, encoded; the
    rank's entry point decodes exactly what was checked, shell characters and quotes included."""
    from bigtrain.config.overrides import OVERRIDES_ENV, encode_overrides
    from bigtrain.runtime import run
    from bigtrain.train import main

    monkeypatch.setattr(run, "run", lambda cfg: pytest.fail("the overrides were not read: a run started"))
    value = str(tmp_path / "no such dir") + '|$(touch pwned) `id` "q"'
    monkeypatch.setenv(OVERRIDES_ENV, encode_overrides([f"data.tokenizer='{value}'"]))  # quoted for Hydra
    monkeypatch.chdir(tmp_path)
    assert main([f"run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert f"Tokenizer folder {value!r} (data.tokenizer) does not exist" in err, err
    assert not (tmp_path / "pwned").exists()
