"""The `bigtrain` command's tools: plan (with memory), report, sample, export, sweep, hosts, prebuild."""
