"""Data at corpus scale: `bigtrain prepare` writes every document's tokens + end-of-text once, holds out
whole documents, refuses bad input writing nothing, and does nothing for unchanged input; the batch plan
hands every rank its share of the same global batches; a blend follows its weights in an order that
depends only on the seed and the position."""

import gzip
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from conftest import BIN, bigtrain_in_process

from bigtrain.components.data.blend import Blend
from bigtrain.components.data.loader import BatchPlan
from bigtrain.components.data.prepare import held_out, prepare, read_meta
from bigtrain.components.data.prepared import PreparedSplit
from bigtrain.components.data.raw import records
from bigtrain.components.data.tokenizer import load_tokenizer
from bigtrain.config import compose
from bigtrain.config.compose import ASSET_DIR
from bigtrain.errors import ConfigError


def prepare_cli(*args) -> subprocess.CompletedProcess:
    return bigtrain_in_process("prepare", "--no-progress", *args)


@pytest.fixture(scope="module")
def bundled_prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "bundled"
    cfg = compose([])
    prepare(cfg.data, out, workers=1, validation_fraction=0.05, seed=11, progress=False)
    return cfg, out


# --------------------------------------------------------------------------- prepared shards


def test_prepared_shards_hold_every_document_as_its_tokens_and_end_of_text(bundled_prepared):
    cfg, out = bundled_prepared
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    splits = {name: PreparedSplit(out, name) for name in ("train", "validation")}
    seen = {"train": 0, "validation": 0}
    for record in records(cfg.data):
        name = "validation" if held_out(record, 11, 0.05) else "train"
        split, i = splits[name], seen[name]
        stored = split.tokens[split.doc_starts[i]:split.doc_starts[i + 1]].tolist()
        assert stored == tokenizer(record["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seen[name] += 1
    assert seen == {name: split.documents for name, split in splits.items()}
    meta = read_meta(out)
    assert meta["dtype"] == "uint16" and splits["train"].tokens.dtype == np.uint16  # 4096 ids fit in 2 bytes
    assert meta["splits"]["train"]["tokens"] == len(splits["train"].tokens)
    assert (out / "train.bin").stat().st_size == 2 * len(splits["train"].tokens)


def test_training_and_validation_share_no_document(bundled_prepared):
    _, out = bundled_prepared
    docs = {}
    for name in ("train", "validation"):
        split = PreparedSplit(out, name)
        docs[name] = {split.tokens[a:b].tobytes() for a, b in zip(split.doc_starts[:-1], split.doc_starts[1:])}
    assert docs["validation"] and docs["train"]
    assert not docs["train"] & docs["validation"]
    assert 0.02 < len(docs["validation"]) / (len(docs["train"]) + len(docs["validation"])) < 0.1


def test_the_held_out_choice_depends_on_the_document_and_the_seed_only():
    record = {"text": "a document"}
    assert held_out(record, 1, 0.5) == held_out(dict(record), 1, 0.5)
    choices = [held_out({"text": f"doc {i}"}, 3, 0.3) for i in range(20000)]
    assert abs(sum(choices) / len(choices) - 0.3) < 0.01
    assert choices != [held_out({"text": f"doc {i}"}, 4, 0.3) for i in range(20000)]


@pytest.mark.commands
def test_prepare_again_on_unchanged_input_does_nothing_and_a_changed_input_is_prepared_again(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(300)))
    args = ["--out", tmp_path / "out", "--workers", "1", "data=hf", "data.builder=json", f"data.files=[{corpus}]"]
    first = prepare_cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith(f"prepared {tmp_path / 'out'}")
    assert sum(read_meta(tmp_path / "out")["splits"][s]["documents"] for s in ("train", "validation")) == 300
    stamp = (tmp_path / "out" / "meta.json").stat().st_mtime_ns
    again = prepare_cli(*args)
    assert "is up to date" in again.stdout and (tmp_path / "out" / "meta.json").stat().st_mtime_ns == stamp
    with corpus.open("a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    changed = prepare_cli(*args)
    assert changed.returncode == 0 and "prepared" in changed.stdout
    assert sum(read_meta(tmp_path / "out")["splits"][s]["documents"] for s in ("train", "validation")) == 301
    other_tokenizer = tmp_path / "tokenizer"
    load_tokenizer(str(ASSET_DIR / "tokenizer")).save_pretrained(other_tokenizer)
    (other_tokenizer / "tokenizer_config.json").write_text(
        (other_tokenizer / "tokenizer_config.json").read_text().replace("}", ', "model_max_length": 77}', 1))
    retokenized = prepare_cli(*args, f"data.tokenizer={other_tokenizer}")
    assert "prepared" in retokenized.stdout

    # Workers tokenize batches in parallel; the shards keep the source order, byte for byte.
    one, two = tmp_path / "one", tmp_path / "two"
    for out, workers in ((one, "1"), (two, "2")):
        done = prepare_cli("--out", out, "--workers", workers, "data=hf", "data.builder=json", f"data.files=[{corpus}]")
        assert done.returncode == 0, done.stderr
    for name in ("train.bin", "train.idx", "validation.bin", "validation.idx"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


BAD_SOURCES = {
    "empty_file": (lambda p: p.write_text(""), "is empty"),
    "binary_file": (lambda p: p.write_bytes(bytes(range(256)) * 40), "is binary"),
    "a_folder": (lambda p: p.mkdir(), "is not a regular file"),
    "missing_file": (lambda p: None, "does not exist"),
    "no_text_column": (lambda p: p.write_text('{"body": "hello"}\n'), "has no field 'text' (data.text_field)"),
    "malformed_json": (lambda p: p.write_text('{"text": "a"\n{{{\n'), "cannot be read by data.builder=json"),
}


@pytest.mark.commands
@pytest.mark.parametrize("case", BAD_SOURCES)
def test_bad_input_exits_2_with_one_paragraph_and_writes_nothing(tmp_path, case):
    make, words = BAD_SOURCES[case]
    path = tmp_path / "data.jsonl"
    make(path)
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = prepare_cli("--out", tmp_path / "out", "data=hf", "data.builder=json", f"data.files=[{path}]")
    assert proc.returncode == 2, proc.stderr
    assert words in proc.stderr and proc.stderr.startswith("bigtrain: prepare error:"), proc.stderr
    assert proc.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no partial folder


@pytest.mark.commands
def test_an_out_that_holds_something_else_or_cannot_be_written_is_refused(tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    proc = prepare_cli("--out", taken)
    assert proc.returncode == 2 and "already holds files that are not prepared data" in proc.stderr
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt"]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    proc = prepare_cli("--out", a_file / "sub")
    assert proc.returncode == 2 and "is a file" in proc.stderr


@pytest.mark.commands
def test_a_killed_prepare_leaves_no_folder_that_looks_finished(tmp_path):
    corpus = tmp_path / "big.jsonl"
    with corpus.open("w") as f:
        for i in range(40000):
            f.write(json.dumps({"text": f"line {i} of a corpus large enough to be killed mid-way " * 8}) + "\n")
    out = tmp_path / "out"
    proc = subprocess.Popen([str(BIN / "bigtrain"), "prepare", "--no-progress", "--workers", "1", "--out", str(out),
                             "data=hf", "data.builder=json", f"data.files=[{corpus}]"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.partial-*/train.bin")) and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed prepare must not leave the output folder"
    with pytest.raises(ConfigError, match="is not a prepared data folder"):
        read_meta(out)


@pytest.mark.commands
def test_sources_prepared_with_another_tokenizer_are_refused_at_composition(tmp_path, bundled_prepared):
    cfg, out = bundled_prepared
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    tokenizer.add_tokens(["<extra-token>"])
    other_tokenizer = tmp_path / "tokenizer"
    tokenizer.save_pretrained(other_tokenizer)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"text {i}"}) + "\n" for i in range(50)))
    other = tmp_path / "other"
    prepare(compose(["data=hf", "data.builder=json", f"data.files=[{corpus}]", f"data.tokenizer={other_tokenizer}"]).data,
            other, workers=1, progress=False)
    proc = bigtrain_in_process("config", "data=prepared",
                               f"data.sources=[{{path: {out}, weight: 0.5}}, {{path: {other}, weight: 0.5}}]")
    assert proc.returncode == 2 and "was prepared with the tokenizer in" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1


# ------------------------------------------------------------------------------ plans and blends


def plan(dp_size, dp_rank, micro=4, accum=1):
    return BatchPlan(micro_batch_size=micro, grad_accum=accum, dp_size=dp_size, dp_rank=dp_rank)


@pytest.mark.parametrize("dp_size,accum", [(2, 1), (2, 3), (4, 2)])
def test_ranks_together_read_the_single_rank_global_batch(dp_size, accum):
    single = plan(1, 0, micro=4 * dp_size, accum=accum)
    for step in (0, 1, 5, 12):
        expected = sorted(p for m in range(accum) for p in single.positions(step, m))
        got = sorted(p for r in range(dp_size) for m in range(accum) for p in plan(dp_size, r, accum=accum).positions(step, m))
        assert got == expected and len(set(got)) == len(got)


def test_resumed_plan_with_another_batch_shape_continues_the_same_stream():
    """2 ranks x 4 sequences for 5 steps, then 1 rank x 4 x 2 accumulation: the sixth global batch
    is the one an uninterrupted 2-rank run would have read."""
    uninterrupted = [p for r in range(2) for p in plan(2, r).positions(5, 0)]
    resumed = plan(1, 0, accum=2)
    resumed.start_step, resumed.start_sample = 5, plan(2, 0).samples_before(5)
    assert sorted(resumed.positions(5, 0) + resumed.positions(5, 1)) == sorted(uninterrupted)


def test_a_blend_follows_its_weights_within_one_percent_over_20000_samples():
    blend = Blend([5000, 300], [0.7, 0.3], seed=3)
    counts = blend.counts_before(20000)
    assert abs(counts[0] / 20000 - 0.7) < 0.01 and abs(counts[1] / 20000 - 0.3) < 0.01
    for start in (0, 137, 5000):  # any stretch, not only from the start
        sources = blend.sources_of(np.arange(start, start + 1000))
        assert abs((sources == 1).mean() - 0.3) < 0.01


def test_a_blend_order_depends_only_on_the_seed_and_the_position():
    a, b = Blend([50, 30], [0.6, 0.4], seed=5), Blend([50, 30], [0.6, 0.4], seed=5)
    whole = a.locate(list(range(0, 400)))
    assert b.locate(list(range(300, 400))) == whole[300:]  # a reader starting late (a resumed rank)
    assert Blend([50, 30], [0.6, 0.4], seed=6).locate(list(range(0, 400))) != whole
    for source, size in ((0, 50), (1, 30)):  # each source: every sample once per epoch
        first_epoch = [i for k, i in whole if k == source][:size]
        assert sorted(first_epoch) == list(range(size))


def test_the_bundled_corpus_as_it_ships_is_what_gets_prepared():
    with gzip.open(ASSET_DIR / "corpus" / "devils_dictionary.jsonl.gz", "rt") as f:
        first = json.loads(f.readline())
    assert next(iter(records(compose([]).data)))["text"] == first["text"]

