"""What bigtrain loads and trusts, and what it refuses to overwrite: no code runs from a checkpoint or a
model folder, one job per run dir, exports that never clobber, runs that read their own checkpoints
wherever they were moved, reused run dirs that do not mix runs, and exports plain transformers uses
correctly."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    FAST,
    REPO,
    _pool,
    bigtrain_in_process,
    pool_main,
    pool_train,
    read_metrics,
)

from bigtrain.components.checkpoint.store import MANIFEST, sha256_of
from bigtrain.runtime.rundir import FolderLock

TRAINED = [*FAST, "train.max_steps=2", "checkpoint.interval=1", "logging.progress=false"]


@pytest.fixture(scope="module")
def trained_run(_pools, tmp_path_factory):
    """A 2-rank ZeRO-2 run with checkpoints at steps 1 and 2, trained once for this module."""
    run_dir = tmp_path_factory.mktemp("safety") / "run"
    _pool(_pools, 2).run(pool_train, [*TRAINED, f"run_dir={run_dir}"])
    return run_dir


@pytest.fixture
def run_copy(trained_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


class Payload:
    """Unpickling this runs `touch MARKER`: the shape of a hostile checkpoint file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_payload(tag_dir: Path, name: str, marker: Path) -> None:
    """Replace one file of a checkpoint with a payload and re-seal the manifest, as an attacker able to
    write the folder would: sizes and checksums all check out."""
    torch.save({"module": Payload(marker)}, tag_dir / name)
    manifest = json.loads((tag_dir / MANIFEST).read_text())
    manifest["files"][name] = {"size": (tag_dir / name).stat().st_size, "sha256": sha256_of(tag_dir / name)}
    (tag_dir / MANIFEST).write_text(json.dumps(manifest))


# ------------------------------------------------------------------------ 1. code in checkpoints


@pytest.mark.multiprocess
@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "rng_rank_00000.pt",
                                    "zero_pp_rank_1_mp_rank_00_optim_states.pt"])
def test_a_checkpoint_carrying_code_is_refused_by_export_sample_and_resume(run_copy, rank_pool1, tmp_path, victim):
    marker = tmp_path / "code_ran"
    plant_payload(run_copy / "checkpoints" / "step_00000002", victim, marker)

    export = bigtrain_in_process("export", run_copy, tmp_path / "out")
    sample = bigtrain_in_process("sample", run_copy, "--prompt", "hi")
    [(code, stderr)] = rank_pool1.run(pool_main, [*TRAINED, "train.max_steps=3", f"run_dir={run_copy}"])
    resume = subprocess.CompletedProcess("resume", code, "", stderr)
    for proc in (export, sample, resume):
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "unpickling it could run code, so nothing was loaded from it" in proc.stderr
    assert victim in export.stderr and "posix.system" in export.stderr  # os.system, as pickle names it
    assert not marker.exists(), "the payload ran"
    assert not (tmp_path / "out").exists()


@pytest.mark.commands
def test_a_model_or_tokenizer_folder_that_asks_to_run_its_code_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}))
    model = bigtrain_in_process("config", f"model.pretrained={folder}")
    tokenizer = bigtrain_in_process("config", f"data.tokenizer={folder}")
    for proc, what in ((model, "model.pretrained"), (tokenizer, "tokenizer")):
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert what in proc.stderr and "which bigtrain never does" in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1  # one paragraph, no traceback, no prompt
    assert not marker.exists()


# ------------------------------------------------------------------------------ 3. the run-dir lock


@pytest.mark.multiprocess
def test_a_second_job_on_a_locked_run_dir_exits_2_naming_the_holder_and_writes_nothing(run_copy, rank_pool1):
    before = {p: p.stat().st_mtime_ns for p in run_copy.rglob("*") if p.is_file() and p.name != ".lock"}
    holder = FolderLock(run_copy)
    holder.acquire()
    try:
        [(code, stderr)] = rank_pool1.run(pool_main, [*TRAINED, "train.max_steps=4", f"run_dir={run_copy}"])
    finally:
        holder.release()
    assert code == 2
    assert f"{run_copy} is in use by another job (held by pid {os.getpid()}" in stderr
    after = {p: p.stat().st_mtime_ns for p in run_copy.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before, "the refused job touched the first job's files"


@pytest.mark.commands
def test_the_lock_of_a_job_that_died_does_not_block_the_next(tmp_path):
    code = (f"from pathlib import Path; from bigtrain.runtime.rundir import FolderLock; "
            f"FolderLock(Path({str(tmp_path)!r})).acquire(); print('locked', flush=True); import time; time.sleep(60)")
    dead = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert dead.stdout.readline().strip() == "locked"
    with pytest.raises(Exception, match="is in use by another job"):
        FolderLock(tmp_path).acquire()
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    lock = FolderLock(tmp_path)
    lock.acquire()  # the kernel let go of the dead holder's lock; its lock file is still there
    lock.release()
    assert (tmp_path / ".lock").exists()


# ------------------------------------------------------------------------------------- 4-5. export


@pytest.mark.multiprocess
def test_export_refuses_a_non_empty_or_file_out_and_replaces_only_when_asked(run_copy, tmp_path):
    filled = tmp_path / "filled"
    filled.mkdir()
    (filled / "model-00001-of-00002.safetensors").write_text("precious")
    as_file = tmp_path / "a_file"
    as_file.write_text("not a folder")
    for out in (filled, as_file):
        proc = bigtrain_in_process("export", run_copy, out)
        assert proc.returncode == 2 and ("already holds files" in proc.stderr or "is a file" in proc.stderr)
    assert (filled / "model-00001-of-00002.safetensors").read_text() == "precious"
    assert as_file.read_text() == "not a folder"

    proc = bigtrain_in_process("export", run_copy, filled, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in filled.iterdir() if p.suffix == ".safetensors") == ["model.safetensors"]
    assert not list(tmp_path.glob(".filled*")), "no partial or replaced folder is left behind"


@pytest.mark.multiprocess
def test_a_moved_run_exports_its_own_checkpoints(trained_run, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(trained_run, moved)
    original = moved / "checkpoints"
    # The copy's newest checkpoint is step 2; take it away from the copy only, so that reading the
    # original's (config.yaml names it) would export step 2, and reading the copy's exports step 1.
    shutil.rmtree(original / "step_00000002")
    (original / "latest").write_text("step_00000001")
    proc = bigtrain_in_process("export", moved, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "step_00000001" in proc.stderr and str(moved) in proc.stderr


# ------------------------------------------------------------------------------- 6. reused run dirs


@pytest.mark.multiprocess
def test_resuming_a_checkpoint_of_another_model_is_refused_and_changes_nothing(run_copy, rank_pool1):
    config_before = (run_copy / "config.yaml").read_text()
    [(code, stderr)] = rank_pool1.run(pool_main, [
        *TRAINED, "train.max_steps=3", "model.hf_config.intermediate_size=512", f"run_dir={run_copy}"])
    assert code == 2
    assert "was saved by a run of a different model" in stderr
    assert (run_copy / "config.yaml").read_text() == config_before


@pytest.mark.multiprocess
def test_a_fresh_start_keeps_the_old_metrics_and_a_torn_line_does_not_stop_a_resume(run_copy, rank_pool1):
    records = read_metrics(run_copy)
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 7.1')  # a crash mid-write
    [(code, stderr)] = rank_pool1.run(pool_main, [*TRAINED, "train.max_steps=3", f"run_dir={run_copy}"])
    assert code == 0, stderr[-3000:]
    assert [r["step"] for r in read_metrics(run_copy)] == [1, 2, 3]

    shutil.rmtree(run_copy / "checkpoints")
    [(code, stderr)] = rank_pool1.run(pool_main, [*TRAINED, "train.max_steps=1", f"run_dir={run_copy}"])
    assert code == 0, stderr[-3000:]
    kept = [json.loads(line) for line in (run_copy / "metrics.1.jsonl").read_text().splitlines()]
    assert [r["step"] for r in kept] == [1, 2, 3] and kept[:2] == records[:2]
    assert [r["step"] for r in read_metrics(run_copy)] == [1]


# ---------------------------------------------------------------------------- 7. launcher inputs


def test_overrides_reach_the_ranks_byte_for_byte_through_the_environment():
    from bigtrain.config.overrides import decode_overrides, encode_overrides

    hostile = ["run_dir=/x|touch /tmp/pwned", "model.name='a b' \"c\" $(id) `id`", "data.files=[a,*]"]
    encoded = encode_overrides(hostile)
    assert set(encoded) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
    assert decode_overrides(encoded) == hostile


@pytest.mark.commands
def test_slurm_slots_that_are_not_a_number_are_refused(tmp_path):
    env = dict(os.environ, SLURM_JOB_NODELIST="n1", SLURM_JOB_ID="1", SLOTS_PER_NODE="1/;touch pwned;s/x",
               SLURM_SUBMIT_DIR=str(tmp_path))
    proc = subprocess.run(["bash", str(REPO / "launchers" / "slurm.sbatch")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "not a number of processes per node" in proc.stderr
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "runs").exists()


@pytest.mark.commands
def test_the_watchdog_kills_only_whole_number_pids_of_its_own_job(tmp_path):
    from bigtrain.runtime.watchdog import Watchdog

    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    dog = Watchdog(tmp_path, rank=0, world_size=3, hang_timeout_s=5, job="job-a")
    beats = {1: {"pid": "1; touch pwned", "host": dog.host}, 2: {"pid": victim.pid, "host": dog.host}}
    dog._kill_local([1, 2], beats)
    assert victim.wait(timeout=10) == -signal.SIGKILL
    assert not Path("pwned").exists()
    (tmp_path / "heartbeat").mkdir()
    (tmp_path / "heartbeat" / "rank_1.json").write_text(json.dumps({"job": "job-b", "time": time.time(), "pid": 1}))
    assert 1 not in dog.read_beats(), "another job's heartbeat is not read as this job's"


# ----------------------------------------------------------------------- 12. special-token ids


@pytest.mark.multiprocess
def test_an_export_carries_the_tokenizers_special_tokens_and_generation_stops_at_its_eos(run_copy, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    assert bigtrain_in_process("export", run_copy, out).returncode == 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    eos = tokenizer.eos_token_id
    assert model.config.eos_token_id == eos == model.generation_config.eos_token_id
    assert model.config.bos_token_id == tokenizer.bos_token_id
    # A model whose output is all zeros predicts token 0 every time, which in the bundled tokenizer is
    # its end-of-text token: plain generate must stop there (with transformers' default eos id 2, a
    # double quote, it would not).
    assert eos == 0
    with torch.no_grad():
        model.model.norm.weight.zero_()
        prompt = tokenizer("A computer is", return_tensors="pt")
        generated = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 1
