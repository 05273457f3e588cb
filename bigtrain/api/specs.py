"""Turn the Python API's model and data arguments (names, paths, config and dataset objects) into the
config overrides a launched run composes."""

from pathlib import Path
from typing import Any

from bigtrain.config.compose import CONF_DIR
from bigtrain.config.overrides import format_value
from bigtrain.errors import ConfigError

# File suffixes `datasets` reads with a builder of its own.
BUILDERS = {".txt": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def model_overrides(model: Any) -> tuple[str, list[str], dict | None]:
    """(name, overrides, free-form hf_config or None) for a model name, folder, PretrainedConfig, or
    a dict {"model_name": name or folder}."""
    from transformers import PretrainedConfig

    if isinstance(model, dict):
        unknown = sorted(set(model) - {"model_name"})
        if "model_name" not in model or unknown:
            raise ConfigError(
                f"model={model!r}: a model given as a dict names it with one key, model_name, e.g. "
                "{'model_name': 'tiny_llama'} (a model in conf/model or a Hugging Face model folder)."
            )
        model = model["model_name"]

    if isinstance(model, PretrainedConfig):
        # Only what differs from the family's defaults, which the ranks' config class fills in again.
        defaults = type(model)().to_dict()
        hf_config = {k: v for k, v in model.to_dict().items()
                     if k not in ("model_type", "architectures", "transformers_version", "dtype", "torch_dtype",
                                  "_name_or_path") and defaults.get(k, object()) != v}
        name = f"{model.model_type}-custom"
        return name, [f"model.family={model.model_type}", f"model.name={name}"], hf_config
    text = str(model)
    if (CONF_DIR / "model" / f"{text}.yaml").is_file():
        return text, [f"model={text}"], None
    folder = Path(text).expanduser()
    if (folder / "config.json").is_file():
        overrides = [f"model.pretrained={format_value(str(folder.absolute()))}", f"model.name={folder.name}"]
        if any((folder / f).is_file() for f in TOKENIZER_FILES):  # train with the model's own tokenizer
            overrides.append(f"data.tokenizer={format_value(str(folder.absolute()))}")
        return folder.name, overrides, None
    names = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
    raise ConfigError(
        f"model={model!r} is neither a model in conf/model ({', '.join(names)}) nor a Hugging Face model "
        "folder (with config.json). Pass one of those names, a folder, or a transformers PretrainedConfig."
    )


DATA_KEYS = {"path", "text_field", "samples", "features"}


def data_overrides(data: Any, staging_dir: Path) -> list[str]:
    """Overrides for `data`: None (bundled corpus), a file or folder, a `datasets` object, which is
    written to `staging_dir` as Parquet for the launched ranks to read, or a dict describing the data
    ("path", "text_field", "samples": at most this many samples, "features": tokens per sample)."""
    if data is None:
        return []
    if isinstance(data, dict):
        return _described_data_overrides(data, staging_dir)
    try:
        from datasets import Dataset, DatasetDict
    except ImportError:  # pragma: no cover - datasets is a dependency
        Dataset = DatasetDict = ()
    if isinstance(data, DatasetDict):
        if "train" not in data:
            raise ConfigError(f"The DatasetDict has no 'train' split (splits: {list(data)}). Pass one Dataset.")
        data = data["train"]
    if isinstance(data, Dataset):
        return _dataset_overrides(data, staging_dir)
    path = Path(str(data)).expanduser().absolute()
    files = sorted(p for p in path.iterdir() if p.suffix in BUILDERS) if path.is_dir() else [path]
    if not path.exists() or not files:
        raise ConfigError(
            f"data={str(data)!r} is not an existing file or a folder holding {', '.join(sorted(BUILDERS))} "
            "files. Pass such a path, a datasets.Dataset, or None for the bundled corpus."
        )
    builders = {BUILDERS.get(p.suffix) for p in files}
    if None in builders or len(builders) > 1:
        raise ConfigError(
            f"Cannot tell how to read {[p.name for p in files]}: use files of one kind, with a suffix among "
            f"{', '.join(sorted(BUILDERS))}."
        )
    return ["data=hf", f"data.builder={builders.pop()}", f"data.files={format_value([str(p) for p in files])}"]


def _dataset_overrides(dataset, staging_dir: Path) -> list[str]:
    text_columns = [name for name, feature in dataset.features.items()
                    if getattr(feature, "dtype", None) in ("string", "large_string")]
    column = "text" if "text" in text_columns else (text_columns[0] if len(text_columns) == 1 else None)
    if column is None:
        raise ConfigError(
            f"The dataset's text column is not clear (string columns: {text_columns}). Keep one, or name it "
            "'text' (dataset.rename_column(...))."
        )
    staging_dir.mkdir(parents=True, exist_ok=True)
    path = staging_dir / "train.parquet"
    dataset.select_columns([column]).to_parquet(str(path))
    return ["data=hf", "data.builder=parquet", f"data.files={format_value([str(path)])}",
            f"data.text_field={column}"]


def _described_data_overrides(data: dict, staging_dir: Path) -> list[str]:
    unknown = sorted(set(data) - DATA_KEYS)
    if unknown:
        raise ConfigError(
            f"data={data!r}: unknown key(s) {unknown}. A dict describing the data takes {sorted(DATA_KEYS)}: "
            "path (a file or folder; default the bundled corpus), text_field, samples (train on at most this "
            "many samples) and features (tokens per sample)."
        )
    overrides = data_overrides(data["path"], staging_dir) if data.get("path") is not None else []
    if "text_field" in data:
        overrides.append(f"data.text_field={format_value(str(data['text_field']))}")
    for key, target in (("samples", "data.max_samples"), ("features", "train.seq_len")):
        if key in data:
            value = data[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"data[{key!r}]={value!r} must be a whole number of 1 or more.")
            overrides.append(f"{target}={value}")
    return overrides
