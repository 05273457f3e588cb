"""Where a run's samples come from, and how they are shaped.

- data=prepared: the folders in data.sources (written by `bigtrain prepare`), each a path or
  {path, weight}; several are blended by weight.
- data=bundled, data=hf: the source the group describes, prepared once into a cache folder
  (data.cache_dir, default ~/.cache/bigtrain/prepared/<key>) with worker processes, then read exactly
  like data=prepared. The key covers the files (size, modification time), the tokenizer and every
  setting that changes the tokens, so a changed input is prepared again. Ranks (and jobs) that find
  the folder being prepared wait on a file lock for it, then read it.

Evaluation reads eval.sources if given, else the training folders, from their validation split.
"""

import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from bigtrain.components.data.prepare import META, prepare, read_meta, source_key
from bigtrain.components.data.prepared import PreparedSplit, Samples, Shaping
from bigtrain.errors import ConfigError


@dataclass(frozen=True)
class Source:
    path: Path
    weight: float

    @property
    def name(self) -> str:
        return self.path.name


def is_prepared(data_cfg: DictConfig) -> bool:
    """data=prepared: the run reads folders written by `bigtrain prepare`."""
    return bool(data_cfg.sources)


def parse_sources(entries, key: str) -> list[Source]:
    """`data.sources` / `eval.sources`: each a folder, or {path: folder, weight: w} with w > 0."""
    sources = []
    for number, entry in enumerate(entries):
        if isinstance(entry, str):
            path, weight = entry, 1.0
        elif isinstance(entry, (dict, DictConfig)) and set(entry) <= {"path", "weight"} and "path" in entry:
            path, weight = entry["path"], entry.get("weight", 1.0)
        else:
            raise ConfigError(
                f"{key}[{number}]={entry!r} is not a source: give a prepared folder, or {{path: FOLDER, weight: W}}, "
                f"e.g. '{key}=[{{path: /data/web, weight: 0.7}}, {{path: /data/code, weight: 0.3}}]'."
            )
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight > 0:
            raise ConfigError(f"{key}[{number}] has weight {weight!r}; a weight is a positive number (the blend's share).")
        sources.append(Source(Path(str(path)).expanduser().absolute(), float(weight)))
    return sources


def training_sources(cfg: DictConfig) -> list[Source]:
    if is_prepared(cfg.data):
        return parse_sources(cfg.data.sources, "data.sources")
    return [Source(cache_folder(cfg.data), 1.0)]


def evaluation_sources(cfg: DictConfig) -> list[Source]:
    return parse_sources(cfg.eval.sources, "eval.sources") if cfg.eval.sources else training_sources(cfg)


def cache_folder(data_cfg: DictConfig) -> Path:
    """The folder the source of a data=bundled/hf run is prepared into, named after all it depends on."""
    key = {**source_key(data_cfg), "validation": [data_cfg.validation_fraction, data_cfg.validation_seed]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    root = Path(data_cfg.cache_dir) if data_cfg.cache_dir else cache_root()
    return root / f"{data_cfg.name}-{digest}"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bigtrain" / "prepared"


def ensure_prepared(cfg: DictConfig, progress: bool = False) -> None:
    """Prepare the data of a data=bundled/hf run into its cache folder unless it is there. Every rank
    calls this: the first to take the folder's lock prepares, the others wait and find it done."""
    if is_prepared(cfg.data):
        return
    folder = cache_folder(cfg.data)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / META).is_file():
            prepare(cfg.data, folder, workers=cfg.data.prepare_workers, progress=progress,
                    validation_fraction=cfg.data.validation_fraction, seed=cfg.data.validation_seed)


def shaping(cfg: DictConfig, pad_id: int) -> Shaping:
    data = cfg.data
    cross = data.cross_document_attention
    return Shaping(
        seq_len=cfg.train.seq_len,
        packing=data.packing,
        whole_documents=data.format != "text",
        cross_document_attention=(data.format == "text") if cross is None else cross,
        drop_too_long=data.too_long == "drop",
        pad_id=pad_id,
    )


def open_samples(cfg: DictConfig, sources: list[Source], split: str) -> list[Samples]:
    """The samples of each source's `split` (an evaluation source without a validation split is read
    whole), shaped as the run's config says."""
    result = []
    for source in sources:
        meta = read_meta(source.path)
        tokenizer = meta["tokenizer"]
        pad = tokenizer.get("pad_token_id")
        pad = pad if pad is not None else (tokenizer.get("eos_token_id") or 0)
        chosen = split if split == "train" or meta["splits"]["validation"]["documents"] else "train"
        samples = Samples(PreparedSplit(source.path, chosen), shaping(cfg, pad))
        if split == "train" and cfg.data.max_samples is not None:
            samples.count = min(samples.count, cfg.data.max_samples)
        result.append(samples)
    return result


def check_sources(cfg: DictConfig, vocab_size: int) -> None:
    """Before any rank starts: a bundled/hf source's files and first record; prepared folders that exist,
    share one tokenizer (the run's), and whose token ids fit the model's vocabulary."""
    if not is_prepared(cfg.data):
        from bigtrain.components.data.raw import check_files, check_first_record

        check_files(cfg.data)
        # A cache prepared from these very files (same sizes and times, same tokenizer and format)
        # was read whole once already; reading the first record again would only cost the import.
        if not (cache_folder(cfg.data) / META).is_file():
            check_first_record(cfg.data)
        return
    from bigtrain.components.data.tokenizer import tokenizer_fingerprint

    expected = tokenizer_fingerprint(cfg.data.tokenizer)
    for key, sources in (("data.sources", training_sources(cfg)), ("eval.sources", evaluation_sources(cfg))):
        for source in sources:
            meta = read_meta(source.path)
            made = meta["tokenizer"]
            if made["fingerprint"] != expected:
                raise ConfigError(
                    f"{key}: {source.path} was prepared with the tokenizer in {made['path']} (fingerprint "
                    f"{made['fingerprint']}), but this run tokenizes with {cfg.data.tokenizer} ({expected}): the same "
                    "ids would mean different text. Prepare every source with one tokenizer, and train with it "
                    "(data.tokenizer)."
                )
            if made["vocab_size"] > vocab_size:
                raise ConfigError(
                    f"{key}: {source.path} holds token ids up to {made['vocab_size'] - 1}, but the model has "
                    f"vocab_size={vocab_size}. Use a model with at least {made['vocab_size']} embeddings "
                    f"(++model.hf_config.vocab_size={made['vocab_size']}), or data prepared with a smaller tokenizer."
                )

