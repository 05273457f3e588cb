"""bigtrain's benchmarks: run by hand, results under benchmarks/results/."""
