"""The bundled corpus packs into fixed blocks, and the batch plan hands every rank its share of
the same global batches, whatever the number of ranks."""

import pytest
import torch

from bigtrain.components.data.loader import BatchPlan
from bigtrain.components.data.packed import build_packed_dataset
from bigtrain.components.data.tokenizer import load_tokenizer
from bigtrain.config import compose
from bigtrain.errors import ConfigError


def plan(dp_size, dp_rank, micro=4, accum=1, blocks=100, seed=7):
    return BatchPlan(num_blocks=blocks, micro_batch_size=micro, grad_accum=accum,
                     dp_size=dp_size, dp_rank=dp_rank, seed=seed)


@pytest.mark.parametrize("dp_size,accum", [(2, 1), (2, 3), (4, 2)])
def test_ranks_together_read_the_single_rank_global_batch(dp_size, accum):
    single = plan(1, 0, micro=4 * dp_size, accum=accum)
    for step in (0, 1, 5, 12):  # 12 straddles the first epoch boundary
        expected = sorted(i for m in range(accum) for i in single.indices(step, m))
        shards = [plan(dp_size, r, accum=accum).indices(step, m) for r in range(dp_size) for m in range(accum)]
        got = sorted(i for shard in shards for i in shard)
        assert got == expected
        first, last = single.samples_before(step), single.samples_before(step + 1) - 1
        if first // 100 == last // 100:  # within one epoch, no block twice in a global batch
            assert len(set(got)) == len(got)


def test_order_is_seeded_and_changes_each_epoch():
    a, b, c = plan(2, 0), plan(2, 0), plan(2, 0, seed=8)
    assert a.indices(3, 0) == b.indices(3, 0)
    assert a.indices(3, 0) != c.indices(3, 0)
    epoch0 = [a._block_at(p) for p in range(100)]
    epoch1 = [a._block_at(p) for p in range(100, 200)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(100))  # every block once per epoch
    assert epoch0 != epoch1


def test_resumed_plan_with_another_batch_shape_continues_the_same_stream():
    """2 ranks x 4 sequences for 5 steps, then 1 rank x 4 x 2 accumulation: the sixth global batch
    is the one an uninterrupted 2-rank run would have read."""
    uninterrupted = [i for r in range(2) for i in plan(2, r).indices(5, 0)]
    before = plan(2, 0).samples_before(5)
    resumed = plan(1, 0, accum=2)
    resumed.start_step, resumed.start_sample = 5, before
    assert sorted(resumed.indices(5, 0) + resumed.indices(5, 1)) == sorted(uninterrupted)


def test_a_dataset_smaller_than_one_global_batch_is_refused():
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        plan(2, 0, micro=64, blocks=100)


def test_bundled_corpus_packs_into_seq_len_blocks_of_real_tokens():
    cfg = compose(["train.seq_len=64"])
    dataset = build_packed_dataset(cfg.data, 64)
    assert len(dataset) > 5000  # about half a million tokens
    block = dataset[0]["input_ids"]
    assert block.shape == (64,) and block.dtype == torch.int64
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    assert int(dataset[:200]["input_ids"].max()) < len(tokenizer)
    text = tokenizer.decode(block)
    assert sum(ch.isalpha() for ch in text) > 0.5 * len(text)


def test_text_field_missing_from_data_is_refused(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"body": "hello"}\n')
    cfg = compose(["data=hf", "data.builder=json", f"data.files=[{path}]", "data.text_field=text",
                   f"data.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(ConfigError, match=r"data.text_field='text' is not a column .*\['body'\]"):
        build_packed_dataset(cfg.data, 8)


def test_local_text_files_through_hf_group(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("\n".join(f"line number {i} of a plain text file" for i in range(200)))
    cfg = compose(["data=hf", f"data.files=[{path}]", f"data.cache_dir={tmp_path / 'cache'}"])
    dataset = build_packed_dataset(cfg.data, 16)
    assert len(dataset) > 50
