"""Values derived from the config that several parts of bigtrain act on."""

from omegaconf import DictConfig


def resolve_device(cfg: DictConfig) -> str:
    """The device this run trains on: 'cuda' or 'cpu'."""
    if cfg.train.device != "auto":
        return cfg.train.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
