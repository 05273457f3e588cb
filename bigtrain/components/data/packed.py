"""Training sequences: load text with `datasets`, tokenize, and pack into fixed-length blocks."""

import contextlib
import hashlib

import torch.distributed as dist
from datasets import Dataset, load_dataset
from omegaconf import DictConfig

from bigtrain.components.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from bigtrain.distributed.process_group import long_wait_group
from bigtrain.errors import ConfigError


def build_packed_dataset(data_cfg: DictConfig, seq_len: int) -> Dataset:
    """Tokenize every document, append EOS, concatenate, and cut into `seq_len`-token blocks
    (the tail shorter than one block is dropped). Cached by `datasets` between runs."""
    tokenizer = load_tokenizer(data_cfg.tokenizer)
    files = list(data_cfg.files) or None
    raw = load_dataset(data_cfg.builder, data_files=files, split=data_cfg.split, cache_dir=data_cfg.cache_dir)
    if data_cfg.text_field not in raw.column_names:
        raise ConfigError(
            f"data.text_field={data_cfg.text_field!r} is not a column of the dataset (columns: "
            f"{raw.column_names}). Set data.text_field to the column holding the text."
        )
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize(batch):
        ids = tokenizer(batch[data_cfg.text_field], add_special_tokens=False)["input_ids"]
        return {"ids": [doc + eos for doc in ids]}

    def pack(batch):
        stream = [tok for doc in batch["ids"] for tok in doc]
        usable = len(stream) - len(stream) % seq_len
        return {"input_ids": [stream[i : i + seq_len] for i in range(0, usable, seq_len)]}

    # datasets cannot fingerprint a closure over a tokenizer reliably, so it would redo this work on
    # every launch; name the results after what they depend on so its cache is reused instead.
    key = _fingerprint(raw._fingerprint, data_cfg.tokenizer, data_cfg.text_field)
    tokens = raw.map(tokenize, batched=True, remove_columns=raw.column_names, desc="tokenize",
                     new_fingerprint=f"bigtrain-tokens-{key}")
    # Large map batches keep the tokens lost at batch boundaries (one partial block each) negligible.
    packed = tokens.map(pack, batched=True, batch_size=10_000, remove_columns=["ids"], desc="pack",
                        new_fingerprint=f"bigtrain-pack-{key}-{seq_len}")
    if len(packed) == 0:
        raise ConfigError(
            f"The data has fewer than train.seq_len={seq_len} tokens, so not one training sequence "
            "can be made. Use more data or a smaller train.seq_len."
        )
    return packed.with_format("torch")


def _fingerprint(dataset_fingerprint: str, tokenizer_dir: str, text_field: str) -> str:
    key = f"{dataset_fingerprint}|{text_field}|{tokenizer_fingerprint(tokenizer_dir)}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@contextlib.contextmanager
def rank_zero_first():
    """Let rank 0 fill the `datasets` cache before the other ranks read it, instead of racing."""
    distributed = dist.is_available() and dist.is_initialized()
    group = long_wait_group() if distributed else None
    if distributed and dist.get_rank() != 0:
        dist.barrier(group=group)
    try:
        yield
    finally:  # rank 0 releases the others even when it failed; they then fail the same way
        if distributed and dist.get_rank() == 0:
            dist.barrier(group=group)
