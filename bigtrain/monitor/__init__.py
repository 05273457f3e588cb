"""What a run shows while it trains: step-time split, peak FLOP/s for MFU, CPU/GPU use, progress and sinks."""
