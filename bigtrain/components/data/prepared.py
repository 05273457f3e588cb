"""Reading prepared data (prepare.py) as training samples of `train.seq_len` tokens.

Nothing is tokenized and nothing is loaded whole: the token files are memory-mapped, and a sample is
a window of them. How documents become samples:

- packed, across documents (text pretraining, the default): sample i is tokens [i*L, (i+1)*L) of the
  split's stream of documents; a document may start in one sample and go on in the next.
- packed, whole documents (SFT formats): documents are laid one after another into samples without
  being split; one longer than L is truncated to L or dropped (data.too_long).
- padded (data.packing=false): one document per sample, truncated or dropped when longer than L,
  padded to L.

Within a sample, unless data.cross_document_attention is on, positions restart at every document
and a document's first token is not predicted from the one before it, so documents do not see each
other (transformers builds the block-diagonal mask from the restarting positions).
"""

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("bigtrain")
IGNORE = -100  # label of a token not trained on (transformers' ignore index)


class PreparedSplit:
    """One split of a prepared folder: the token stream, the optional loss mask, document bounds."""

    def __init__(self, folder: Path, split: str):
        from deepspeed.runtime.data_pipeline.data_sampling.indexed_dataset import MMapIndexedDataset

        self.folder, self.split = Path(folder), split
        with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed's reader narrates on stdout
            tokens = MMapIndexedDataset(str(self.folder / split), skip_warmup=True)
            mask_prefix = self.folder / f"{split}_mask"
            mask = MMapIndexedDataset(str(mask_prefix), skip_warmup=True) if mask_prefix.with_suffix(".bin").exists() else None
        self._keep = (tokens, mask)  # the memory maps live as long as this split
        self.tokens = np.frombuffer(tokens._bin_buffer, dtype=tokens.dtype)
        self.mask = np.frombuffer(mask._bin_buffer, dtype=np.uint8) if mask is not None else None
        self.doc_starts = np.concatenate([[0], np.cumsum(tokens.sizes, dtype=np.int64)])

    @property
    def documents(self) -> int:
        return len(self.doc_starts) - 1


@dataclass(frozen=True)
class Shaping:
    """How documents become samples: everything a run's config says about it."""

    seq_len: int
    packing: bool
    whole_documents: bool  # packed without splitting documents (SFT formats)
    cross_document_attention: bool
    drop_too_long: bool
    pad_id: int


class Samples:
    """The samples of one split under one Shaping, addressed by index."""

    def __init__(self, split: PreparedSplit, shaping: Shaping):
        self.split, self.shaping = split, shaping
        L = shaping.seq_len
        self.windows = None  # (start, end) token offsets per sample; None: contiguous windows of L
        if shaping.packing and not shaping.whole_documents:
            self.count = len(split.tokens) // L
        else:
            self.windows = self._windows()
            self.count = len(self.windows)

    def __len__(self) -> int:
        return self.count

    def _windows(self) -> np.ndarray:
        """Sample windows of whole documents (truncated or dropped past seq_len): one per document when
        padding, else as many consecutive documents as fit."""
        L, starts = self.shaping.seq_len, self.split.doc_starts
        lengths = np.diff(starts)
        long = lengths > L
        if long.any():
            log.info("%s/%s: %d of %d documents are longer than train.seq_len=%d and are %s", self.split.folder.name,
                     self.split.split, int(long.sum()), len(lengths), L,
                     "dropped" if self.shaping.drop_too_long else "truncated")
        keep = ~long if self.shaping.drop_too_long else np.ones(len(lengths), dtype=bool)
        ends = np.minimum(starts[1:], starts[:-1] + L)
        docs = np.stack([starts[:-1], ends], axis=1)[keep]
        if not self.shaping.packing:
            return docs
        windows, begin, end = [], None, None
        for start, stop in docs.tolist():
            if begin is not None and end == start and stop - begin <= L:
                end = stop  # the next document follows on in the stream and still fits
                continue
            if begin is not None:
                windows.append((begin, end))
            begin, end = start, stop
        if begin is not None:
            windows.append((begin, end))
        return np.asarray(windows, dtype=np.int64).reshape(-1, 2)

    def window(self, index: int) -> tuple[int, int]:
        if self.windows is None:
            L = self.shaping.seq_len
            return index * L, (index + 1) * L
        start, end = self.windows[index]
        return int(start), int(end)

    def sample(self, index: int) -> dict[str, torch.Tensor]:
        """input_ids, labels (IGNORE where not trained on) and position_ids of sample `index`, each seq_len long."""
        start, end = self.window(index)
        L, split = self.shaping.seq_len, self.split
        ids = np.full(L, self.shaping.pad_id, dtype=np.int64)
        ids[: end - start] = split.tokens[start:end]
        labels = ids.copy()
        labels[end - start:] = IGNORE
        if split.mask is not None:
            labels[: end - start][split.mask[start:end] == 0] = IGNORE
        positions = np.arange(L, dtype=np.int64)
        if not self.shaping.cross_document_attention:
            inside = split.doc_starts[(split.doc_starts > start) & (split.doc_starts < end)] - start
            for boundary in inside.tolist():  # a new document: positions restart, its first token is not predicted
                positions[boundary:] -= positions[boundary]
                labels[boundary] = IGNORE
            positions[end - start:] = np.arange(L - (end - start))  # padding: its own positions, after the rest
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                "position_ids": torch.from_numpy(positions)}

    def label_count(self, index: int) -> int:
        """Tokens of sample `index` whose next token is trained on: what a token-averaged loss divides by."""
        if self.windows is None and self.split.mask is None and self.shaping.cross_document_attention:
            return self.shaping.seq_len - 1  # a full window of plain text: every next token counts
        labels = self.sample(index)["labels"]
        return int((labels[1:] != IGNORE).sum())
