"""Each rank's random-number state, saved with every checkpoint so a resumed run draws exactly what
an uninterrupted one would have (dropout, sampling).

The state is stored as tensors and plain values only, so it loads with torch's weights-only
unpickler (safe_load.py). On a GPU only this rank's own device's generator is saved and restored:
a resumed rank may see fewer GPUs than the saving one did.
"""

import random

import numpy as np
import torch


def rng_file(rank: int) -> str:
    return f"rng_rank_{rank:05d}.pt"


def capture_rng_state() -> dict:
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device: this rank's
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
