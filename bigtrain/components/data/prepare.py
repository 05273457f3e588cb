"""`bigtrain prepare`: tokenize a source once, with worker processes, into DeepSpeed's memory-mapped
indexed-dataset format (the Megatron `.bin`/`.idx` layout), ready for any number of runs and ranks.

    OUT/
      meta.json                     what it was made from and what it holds (written last)
      train.bin, train.idx          the training documents' tokens (uint16 when the vocabulary fits
      validation.bin, .idx          65,536 ids, else int32) and the held-out ones
      train_mask.bin, .idx, ...     for SFT formats: 1 per token trained on, 0 per prompt token

Every document is tokens + end-of-text. The validation split is chosen per document, by a seeded hash
of its content, before anything is packed: a document (and any exact copy of it) feeds training or
evaluation, never both, whatever the sequence length later. The source is streamed and at most a few
batches are in flight, so memory does not grow with the corpus. The folder is written under a
temporary name and renamed when complete: a killed prepare never leaves a folder that looks finished.
"""

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from bigtrain.components.files import replace_folder, staging_dir
from bigtrain.errors import ConfigError

log = logging.getLogger("bigtrain")
META = "meta.json"
FORMAT_VERSION = 1
SPLITS = ("train", "validation")
BATCH_DOCUMENTS = 256  # documents a worker tokenizes at a time
IN_FLIGHT_PER_WORKER = 4  # batches queued per worker: enough to keep them busy, bounded memory


@dataclass
class Prepared:
    out: Path
    meta: dict
    up_to_date: bool  # nothing was done: the folder already held this source, prepared the same way


def prepare(data_cfg: DictConfig, out: Path, *, workers: int = 0, validation_fraction: float = 0.02,
            seed: int = 1234, progress: bool = True) -> Prepared:
    """Prepare the source `data_cfg` describes into `out`; nothing is written if `out` already holds it."""
    from bigtrain.components.data.raw import check_files, check_first_record
    from bigtrain.components.data.tokenizer import load_tokenizer

    out = Path(out).absolute()
    _check_out(out)
    if not 0.0 <= validation_fraction < 1.0:
        raise ConfigError(f"The validation fraction must be in [0, 1), got {validation_fraction}.")
    inputs = {
        **source_key(data_cfg),
        "validation_fraction": validation_fraction,
        "seed": seed,
        "format_version": FORMAT_VERSION,
    }
    existing = read_meta(out) if (out / META).is_file() else None
    if existing is not None and existing.get("inputs") == inputs:
        return Prepared(out, existing, up_to_date=True)
    check_files(data_cfg)  # before anything is written
    check_first_record(data_cfg)
    tokenizer = load_tokenizer(data_cfg.tokenizer)
    staging = staging_dir(out)
    try:
        meta = _write(data_cfg, staging, tokenizer, inputs, workers or os.cpu_count() or 1, progress)
        replace_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Prepared(out, meta, up_to_date=False)


# The data keys a prepared folder depends on (the others choose how it is read, per run).
PREPARE_KEYS = ("builder", "split", "text_field", "format", "prompt_field", "completion_field", "messages_field",
                "chat_template", "train_on_prompt")


def read_meta(folder: Path) -> dict:
    """The meta.json of a prepared folder; refused with one paragraph when there is none or it is damaged."""
    path = Path(folder) / META
    try:
        meta = json.loads(path.read_text())
        meta["splits"], meta["tokenizer"]  # noqa: B018 - the keys this needs exist
    except FileNotFoundError:
        raise ConfigError(
            f"{folder} is not a prepared data folder (no {META}): prepare it with `bigtrain prepare --out {folder} "
            "[data overrides]`, or point data.sources at one that was."
        ) from None
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path} is damaged ({err}); prepare {folder} again with `bigtrain prepare`.") from None
    return meta


def source_key(data_cfg: DictConfig) -> dict:
    """What a source's tokens depend on: its files (path, size, time), the tokenizer's files, the data
    keys that shape records into text, and the built-in chat template where chat data uses it (the
    template can change between releases; a tokenizer's own or data.chat_template is in the others)."""
    from bigtrain.components.data.formats import DEFAULT_CHAT_TEMPLATE
    from bigtrain.components.data.tokenizer import tokenizer_fingerprint

    return {
        "sources": _signature(data_cfg),
        "tokenizer": tokenizer_fingerprint(data_cfg.tokenizer),
        "data": {key: data_cfg[key] for key in PREPARE_KEYS},
        "default_chat_template": DEFAULT_CHAT_TEMPLATE if data_cfg.format == "chat" else None,
    }


def _signature(data_cfg: DictConfig) -> list[dict]:
    from bigtrain.components.data.raw import check_file, source_signature

    for path in data_cfg.files:  # a missing or unreadable file is reported as such, not as a stat error
        check_file(Path(path), data_cfg.builder)
    return source_signature(data_cfg)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; prepare writes a folder. Give a new folder's path.")
    if out.is_dir() and any(out.iterdir()) and not (out / META).is_file():
        raise ConfigError(
            f"--out {out} already holds files that are not prepared data (no {META}), which a prepare would mix "
            "with its own. Give an empty or new folder."
        )
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        why = "is a file" if not parent.is_dir() else "is not writable by this user"
        raise ConfigError(f"--out {out} cannot be written: {parent} {why}. Give a path in a writable folder.")


def _write(data_cfg: DictConfig, folder: Path, tokenizer, inputs: dict, workers: int, progress: bool) -> dict:
    from deepspeed.runtime.data_pipeline.data_sampling.indexed_dataset import MMapIndexedDatasetBuilder

    from bigtrain.components.data.formats import Formatter

    vocab = len(tokenizer)
    dtype = np.uint16 if vocab <= 2**16 else np.int32
    masked = Formatter(data_cfg, tokenizer).masked
    builders = {split: MMapIndexedDatasetBuilder(str(folder / f"{split}.bin"), dtype=dtype) for split in SPLITS}
    masks = ({split: MMapIndexedDatasetBuilder(str(folder / f"{split}_mask.bin"), dtype=np.uint8) for split in SPLITS}
             if masked else {})
    counts = {split: {"documents": 0, "tokens": 0} for split in SPLITS}
    bar = _progress(progress)
    started = time.perf_counter()
    for batch in _tokenized(data_cfg, inputs, workers):
        for ids, mask, split in batch:
            builders[split].add_item_numpy(ids)
            builders[split].end_document()
            if masked:
                masks[split].add_item_numpy(mask)
                masks[split].end_document()
            counts[split]["documents"] += 1
            counts[split]["tokens"] += len(ids)
        if bar is not None:
            bar.update(len(batch))
            tokens = counts["train"]["tokens"] + counts["validation"]["tokens"]
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - started):,.0f} tokens/s")
    if bar is not None:
        bar.close()
    for split in SPLITS:
        builders[split].finalize(str(folder / f"{split}.idx"))
        if masked:
            masks[split].finalize(str(folder / f"{split}_mask.idx"))
    if counts["train"]["documents"] == 0:
        raise ConfigError("Every document went to the validation split: lower --validation-fraction.")
    meta = {
        "bigtrain_prepared": FORMAT_VERSION, "inputs": inputs, "splits": counts, "masked": masked,
        "tokenizer": {"path": str(Path(data_cfg.tokenizer).resolve()), "fingerprint": inputs["tokenizer"],
                      "vocab_size": vocab, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
        "dtype": np.dtype(dtype).name, "seconds": round(time.perf_counter() - started, 3),
    }
    (folder / META).write_text(json.dumps(meta, indent=1) + "\n")  # last: its presence means complete
    return meta


def _progress(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(unit=" documents", desc="prepare", mininterval=1.0, dynamic_ncols=True)


def _tokenized(data_cfg: DictConfig, inputs: dict, workers: int):
    """Batches of (token ids, mask, split), in source order, tokenized by `workers` processes (in this
    one for 1) with a bounded number of batches in flight."""
    from bigtrain.components.data.raw import records

    settings = (OmegaConf.to_container(data_cfg, resolve=True), inputs["validation_fraction"], inputs["seed"])
    batches = _batched(_checked(records(data_cfg), data_cfg), BATCH_DOCUMENTS)
    # A daemonic process (a worker of someone's multiprocessing pool calling bigtrain.fit) may not
    # start processes of its own: it tokenizes alone.
    if workers <= 1 or multiprocessing.current_process().daemon:
        _start_worker(*settings)
        yield from map(_tokenize_batch, batches)
        return
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked tokenizer threads
    with context.Pool(workers, initializer=_start_worker, initargs=settings) as pool:
        pending = deque()
        for batch in batches:
            pending.append(pool.apply_async(_tokenize_batch, (batch,)))
            if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _checked(stream, data_cfg: DictConfig):
    """The records of `stream`, each refused with one paragraph unless it has the fields data.format reads
    (a chat message without a role or content, a role that is not one), rather than tokenized as it is:
    the check before launch (raw.check_first_record) reads only the first record."""
    from bigtrain.components.data.formats import check_record
    from bigtrain.components.data.raw import _describe

    for number, record in enumerate(stream, 1):
        check_record(record, data_cfg, f"Record {number} of {_describe(data_cfg)}")
        yield record


def _batched(iterable, size: int):
    batch = []
    for item in iterable:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# -------------------------------------------------------------------------------- in each worker

_worker: dict = {}


def _start_worker(data: dict, validation_fraction: float, seed: int) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from bigtrain.components.data.formats import Formatter
    from bigtrain.components.data.tokenizer import load_tokenizer

    data_cfg = OmegaConf.create(data)
    tokenizer = load_tokenizer(data_cfg.tokenizer)
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.int32
    _worker.update(formatter=Formatter(data_cfg, tokenizer), fraction=validation_fraction, seed=seed, dtype=dtype)


def _tokenize_batch(batch: list[dict]) -> list[tuple[np.ndarray, np.ndarray | None, str]]:
    formatter, dtype = _worker["formatter"], _worker["dtype"]
    done = []
    for record in batch:
        document = formatter(record)
        mask = None if document.mask is None else np.asarray(document.mask, dtype=np.uint8)
        if mask is None and formatter.masked:
            mask = np.ones(len(document.ids), dtype=np.uint8)
        split = "validation" if held_out(record, _worker["seed"], _worker["fraction"]) else "train"
        done.append((np.asarray(document.ids, dtype=dtype), mask, split))
    return done


def held_out(record: dict, seed: int, fraction: float) -> bool:
    """Whether a document goes to the validation split: a seeded hash of its content below `fraction`,
    so the choice depends on the document alone (not on its position, the workers or the batches), and
    exact duplicates go the same way."""
    if fraction <= 0:
        return False
    content = json.dumps(record, sort_keys=True, ensure_ascii=False, default=str).encode()
    digest = hashlib.blake2b(content, digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction
