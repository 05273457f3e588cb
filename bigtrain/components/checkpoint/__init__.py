"""Checkpoints: what is on disk (store), saving and resuming (checkpointer), RNG state, and
DeepSpeed's universal format."""
