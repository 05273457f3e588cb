"""Model parallelism, one module per technique: pipeline stages (pipeline.py), tensor sharding
(tensor.py), and the process grid they share with data parallelism (topology.py)."""
