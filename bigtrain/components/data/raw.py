"""The raw source a data group describes (any `datasets` builder over local files, or a hub dataset):
checked before anything is prepared or launched, then streamed record by record.

The checks read little: that each file is a readable, non-empty regular file, that a text file is
text (no NUL bytes, valid UTF-8 at its start), and that the first record has the fields the format
reads. A source that fails them is refused with one paragraph (exit 2), so a bad file never reaches a
rank (where it would fail after launch, again on every relaunch).
"""

import gzip
import itertools
from pathlib import Path
from typing import Iterator

from omegaconf import DictConfig

from bigtrain.components.data.formats import check_record
from bigtrain.config.options import LOCAL_BUILDERS
from bigtrain.errors import ConfigError

BINARY_BUILDERS = {"parquet", "arrow"}  # these formats are binary by design; their readers check them
SNIFF_BYTES = 8192


def check_files(data_cfg: DictConfig) -> None:
    """Refuse a local source whose files are missing, empty, unreadable or not what the builder reads."""
    if data_cfg.builder in LOCAL_BUILDERS:
        if not data_cfg.files:
            raise ConfigError(
                f"data.builder={data_cfg.builder} reads local files, but data.files is empty. "
                "Pass data.files=[/path/a.txt,/path/b.txt]."
            )
        for path in data_cfg.files:
            check_file(Path(path), data_cfg.builder)


def check_first_record(data_cfg: DictConfig) -> None:
    """Refuse a source that holds no record, or whose first record lacks the fields data.format reads."""
    first = next(iter(records(data_cfg, limit=1)), None)
    if first is None:
        raise ConfigError(f"The data ({_describe(data_cfg)}) holds no record. Point data.files at files with data in them.")
    check_record(first, data_cfg, f"The first record of {_describe(data_cfg)}")


def check_file(path: Path, builder: str) -> None:
    where = f"Data file {str(path)!r} (data.files)"
    if not path.exists():
        raise ConfigError(f"{where} does not exist. Fix the path, or use data=bundled for the corpus shipped with bigtrain.")
    if not path.is_file():
        raise ConfigError(f"{where} is not a regular file (a folder or a device). List the files themselves in data.files.")
    try:
        with path.open("rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError as err:
        raise ConfigError(f"{where} cannot be read ({err.strerror}). Check its permissions.") from None
    if not head:
        raise ConfigError(f"{where} is empty. Remove it from data.files, or fill it.")
    if builder in BINARY_BUILDERS:
        return
    if head[:2] == b"\x1f\x8b":  # gzip: look at what it holds
        try:
            with gzip.open(path, "rb") as f:
                head = f.read(SNIFF_BYTES)
        except OSError as err:
            raise ConfigError(f"{where} is a damaged gzip file ({err}).") from None
    if b"\0" in head or not _utf8_prefix(head):
        raise ConfigError(
            f"{where} is binary, not the text data.builder={builder} reads. Pass text files (or set data.builder to "
            "the file's format: parquet, arrow)."
        )


def _utf8_prefix(data: bytes) -> bool:
    """Whether `data`, possibly cut mid-character at its end, is UTF-8."""
    for cut in range(4):
        try:
            data[: len(data) - cut].decode("utf-8")
            return True
        except UnicodeDecodeError:
            continue
    return False


def records(data_cfg: DictConfig, limit: int | None = None) -> Iterator[dict]:
    """The source's records in order, streamed: memory does not grow with the source."""
    from datasets import load_dataset
    from datasets.utils import logging as datasets_logging

    files = list(data_cfg.files) or None
    level = datasets_logging.get_verbosity()
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)  # a parse error is reported once, below
    try:
        stream = load_dataset(data_cfg.builder, data_files=files, split=data_cfg.split, streaming=True)
        iterator = iter(stream)
        for record in itertools.islice(iterator, limit):
            yield record
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds for data it cannot parse
        raise ConfigError(
            f"The data ({_describe(data_cfg)}) cannot be read by data.builder={data_cfg.builder} "
            f"({type(err).__name__}: {' '.join(str(err).split())[:300]}). Check that every file is in that format, "
            f"and that the split {data_cfg.split!r} exists (data.split)."
        ) from None
    finally:
        datasets_logging.set_verbosity(level)


def source_signature(data_cfg: DictConfig) -> list[dict]:
    """What the prepared data depends on, file by file: path, size and modification time."""
    signature = []
    for path in data_cfg.files:
        stat = Path(path).stat()
        signature.append({"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    if not signature:  # a hub dataset: its name and split
        signature.append({"dataset": data_cfg.builder, "split": data_cfg.split})
    return signature


def _describe(data_cfg: DictConfig) -> str:
    files = list(data_cfg.files)
    if not files:
        return f"dataset {data_cfg.builder!r}"
    return f"{files[0]!r}" + (f" and {len(files) - 1} more file(s)" if len(files) > 1 else "")
