"""The Python API: `fit` and `compose` (training.py), `DistributedTraining` and
`GPUAcceleratedTraining` (distributed.py); model and data arguments become overrides in specs.py."""
