"""Rebuild the bundled corpus and tokenizer from Debian's public-domain text packages.

The corpus is The Devil's Dictionary (Ambrose Bierce, 1911; Debian package ``dict-devil``) and the
Jargon File 4.4.7 (Eric S. Raymond, placed in the public domain; Debian package ``jargon-text``).
Both copyright notices state the texts are in the public domain.

Usage (needs the two packages installed): python -m bigtrain.assets.build_assets
"""

import gzip
import json
import re
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

HERE = Path(__file__).parent
SOURCES = {
    "devils_dictionary": "/usr/share/dictd/devil.dict.dz",
    "jargon_file": "/usr/share/doc/jargon-text/jargon.txt.gz",
}
DOC_CHARS = 2000  # paragraphs are grouped into documents of about this many characters
VOCAB_SIZE = 4096


def read_paragraphs(path: str) -> list[str]:
    text = gzip.open(path, "rt", encoding="latin-1").read()
    paragraphs = [re.sub(r"[ \t]+", " ", p.strip()) for p in re.split(r"\n\s*\n", text)]
    # Table-of-contents lines and dictd headers are short: keep real prose only.
    return [p for p in paragraphs if len(p) >= 80]


def group_documents(paragraphs: list[str]) -> list[str]:
    docs, current = [], []
    for p in paragraphs:
        current.append(p)
        if sum(len(c) for c in current) >= DOC_CHARS:
            docs.append("\n\n".join(current))
            current = []
    if current:
        docs.append("\n\n".join(current))
    return docs


def build_corpus() -> list[str]:
    out_dir = HERE / "corpus"
    out_dir.mkdir(exist_ok=True)
    all_docs = []
    for name, path in SOURCES.items():
        docs = group_documents(read_paragraphs(path))
        with gzip.open(out_dir / f"{name}.jsonl.gz", "wt", encoding="utf-8", compresslevel=9) as f:
            for doc in docs:
                f.write(json.dumps({"text": doc}) + "\n")
        all_docs.extend(docs)
        print(f"{name}: {len(docs)} documents")
    return all_docs


def build_tokenizer(docs: list[str]) -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(docs, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.save_pretrained(HERE / "tokenizer")
    print(f"tokenizer: {len(fast)} tokens")


if __name__ == "__main__":
    build_tokenizer(build_corpus())
