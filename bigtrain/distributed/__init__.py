"""Distributed execution: process groups, the process grid, and one module per parallelism technique."""
