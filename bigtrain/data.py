"""Training data: load text with `datasets`, tokenize, pack into fixed-length blocks, and hand each
rank its share of every global batch in a seeded order that depends only on the step number."""

import contextlib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import Dataset, load_dataset
from omegaconf import DictConfig
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from bigtrain.config.errors import ConfigError
from bigtrain.distributed import long_wait_group


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(path)


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
    digest = hashlib.sha256(f"{dataset_fingerprint}|{text_field}".encode())
    for path in sorted(Path(tokenizer_dir).iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


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


@dataclass
class BatchPlan:
    """Which packed blocks each rank reads at each step.

    The data is one endless stream of blocks: epoch e is a permutation of all blocks seeded by
    (seed, e). Global batch `step` is the next `global_batch` positions of that stream, and rank r's
    micro-batch m a contiguous slice of it. The position depends only on the number of samples
    already consumed, so a resumed run, on any number of ranks and with any batch shape, reads
    exactly the blocks an uninterrupted one would have read next.
    """

    num_blocks: int
    micro_batch_size: int
    grad_accum: int
    dp_size: int
    dp_rank: int
    seed: int
    start_step: int = 0
    """Step at which `start_sample` samples had been consumed (set on resume)."""
    start_sample: int = 0
    _cached_epoch: int = field(default=-1, init=False, repr=False)
    _cached_order: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.global_batch > self.num_blocks:
            raise ConfigError(
                f"The dataset has {self.num_blocks} sequences, fewer than one global batch "
                f"({self.global_batch}). Use more data or lower train.micro_batch_size/grad_accum."
            )

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.dp_size

    def samples_before(self, step: int) -> int:
        """Samples consumed by all ranks before `step` starts."""
        return self.start_sample + (step - self.start_step) * self.global_batch

    def indices(self, step: int, micro: int) -> list[int]:
        start = self.samples_before(step) + (micro * self.dp_size + self.dp_rank) * self.micro_batch_size
        return [self._block_at(position) for position in range(start, start + self.micro_batch_size)]

    def _block_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_blocks)
        if self._cached_epoch != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cached_order = torch.randperm(self.num_blocks, generator=generator)
            self._cached_epoch = epoch
        return int(self._cached_order[offset])


class BatchLoader:
    """Micro-batches of token ids for one rank, addressed by (step, micro-batch)."""

    def __init__(self, dataset: Dataset, plan: BatchPlan):
        self.dataset = dataset
        self.plan = plan

    def micro_batch(self, step: int, micro: int) -> torch.Tensor:
        return self.dataset[self.plan.indices(step, micro)]["input_ids"]
