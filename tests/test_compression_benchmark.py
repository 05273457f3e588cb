"""The compression benchmark's code path runs end to end (two options, a few steps), so it cannot
rot unnoticed; its numbers are checked by tests/test_comm.py, not here."""

import pytest
from conftest import BIN

from benchmarks.compression import main as compression
from benchmarks.compression import markdown


@pytest.mark.multiprocess
def test_compression_benchmark_quick(tmp_path):
    # Through torchrun rather than the default deepspeed launcher: the runner takes any launcher.
    launcher = f"{BIN / 'torchrun'} --nproc_per_node {{ranks}} --master_port {{port}} -m"
    result = compression(["--quick", "--out", str(tmp_path), "--launcher", launcher])
    none, onebit = result["rows"]["none"], result["rows"]["onebit"]
    assert none["steps"] == onebit["steps"] == 6
    assert onebit["bytes_reduction"] >= 16  # measured after the 2 warm-up steps
    assert isinstance(onebit["target_met"], bool) and onebit["step_time_s"] > 0
    table = markdown(result)
    assert "| onebit | 0 | 2 |" in table and "(baseline)" in table
    assert not list(tmp_path.iterdir())  # --quick writes no result files
