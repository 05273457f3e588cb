"""The closed sets of values the config's string options take, for validation and for the modules
that act on them."""

LOCAL_BUILDERS = {"json", "text", "csv", "parquet", "arrow"}
OPTIMIZERS = {"adamw", "adam"}
SCHEDULERS = {"warmup_cosine", "wsd", "constant"}
OFFLOAD_DEVICES = {"none", "cpu", "nvme"}
PRECISIONS = {"fp32", "bf16", "fp16"}
# comm options: DeepSpeed's exchange in 16 bits, ZeRO++, and the exchanges bigtrain runs itself.
REDUCED_PRECISION_COMM = {"fp16_reduce": "fp16", "bf16_reduce": "bf16"}
ZEROPP_COMM = {"zeropp", "zeropp_hpz"}
BIGTRAIN_EXCHANGES = {"onebit", "powersgd", "local_sgd"}
COMM_OPTIONS = {"none", *REDUCED_PRECISION_COMM, *ZEROPP_COMM, *BIGTRAIN_EXCHANGES}
OUTER_OPTIMIZERS = {"none", "nesterov"}
# DeepSpeed 0.19 removed these features; a config key for any of them is a hard error there.
REMOVED_DEEPSPEED_KEYS = {
    "sparse_gradients", "elasticity", "compression_training", "amp", "quantize_training",
    "eigenvalue", "sparse_attention", "progressive_layer_drop", "curriculum_learning",
    "graph_harvesting", "nebula",
}
