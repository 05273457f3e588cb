"""Load the tokenizer a run trains with: a local folder, never code of its own."""

import contextlib
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from bigtrain.errors import ConfigError


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved in folder `path`; a folder that is missing, empty or damaged, or that asks
    for code of its own to be run, is refused with one paragraph."""
    folder = Path(path)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise ConfigError(
            f"Tokenizer folder {path!r} {'is empty' if folder.is_dir() else 'does not exist'}. Point data.tokenizer "
            "at a folder saved with tokenizer.save_pretrained() (tokenizer.json, tokenizer_config.json)."
        )
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - broken JSON, missing files, remote code: all the same to the user
        text = " ".join(str(err).split())
        reason = ("it asks for code of its own to be run (auto_map), which bigtrain never does"
                  if "trust_remote_code" in text else f"{type(err).__name__}: {text[:300]}")
        raise ConfigError(
            f"The tokenizer in {path!r} cannot be loaded: {reason}. Point data.tokenizer at a folder saved "
            "with tokenizer.save_pretrained() for a tokenizer class transformers ships."
        ) from None


@contextlib.contextmanager
def quiet_transformers():
    """transformers' own warnings off while bigtrain loads a folder: whatever goes wrong is reported as
    one paragraph of bigtrain's, not as a warning followed by it."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def tokenizer_fingerprint(path: str) -> str:
    """A hash of the tokenizer folder's files: the same tokenizer, the same ids."""
    import hashlib

    digest = hashlib.sha256()
    for file in sorted(Path(path).iterdir()):
        if file.is_file():
            digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]
