"""The pieces a run is built from: checkpoints, data, models, the learning-rate schedule."""
