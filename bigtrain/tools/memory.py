"""Per-rank memory of a training layout, before anything runs: model states after DeepSpeed's own
estimators (extended to fp32 and ZeRO-0/1), activations, ZeRO's communication buffers and the
process itself.

Bytes per parameter of a rank's model shard (P: its parameters, dp: data-parallel ranks, w: bytes of
the training dtype, 4 for fp32 and 2 for bf16/fp16), as DeepSpeed's estimate_zero2/zero3 functions
count them for w = 2 (tests/test_plan.py checks that this formula gives their numbers):

    stage 0:  params w + grads w + Adam moments 8 [+ fp32 master 4 + fp32 grads 4 if w = 2]
    stage 1:  params w + grads w + (fp32 master 4 + fp32 grads 4 + moments 8) / dp
    stage 2:  params w + (grads w + fp32 master 4 + fp32 grads 4 + moments 8) / dp
    stage 3:  (params w + fp32 master 4 + fp32 grads 4 + moments 8) / dp, plus the layer being
              gathered (4 bytes x largest layer)

DeepSpeed keeps a separate fp32 copy of each partition even in fp32 training, hence the same terms.
Offload moves the parenthesised optimizer part (and at ZeRO-3 with offload=full the partitioned
params) to CPU memory (or NVMe).
"""

from dataclasses import dataclass, field

GB = 1e9

# The CPU rank's fixed costs besides the imports (which are measured): DeepSpeed's engine and
# optimizer objects, the process group, the tokenizer and data pipeline, autograd and allocator
# caches. Measured on a 2-core CPU machine as the peak RSS of a rank training a 0.5M-parameter model
# (0.71 GB) less its imports (0.37 GB) and the model's own terms.
CPU_RUNTIME_GB = 0.2
# DeepSpeed's shared-memory all-reduce on the CPU: a 69 MB segment per local rank, which every rank
# maps and touches (its own and its peers'), so each rank's RSS counts all of them.
CPU_SHM_ALLREDUCE_GB = 0.069
# Hugging Face's eager layers keep more for the backward pass than the fused layers the activation
# formula describes (RMSNorm's fp32 intermediates, the rotary products): measured here, 1.4x for
# Llama layers of width 256 and 512 at 256 to 2048 tokens per micro-batch.
HF_LAYER_FACTOR = 1.4
# On a GPU, CUDA context, NCCL buffers and the caching allocator's fragmentation.
GPU_RESERVE_GB = 1.5
# The CPU allocator keeps freed blocks for reuse and peak RSS counts short-lived copies (the model as
# built before DeepSpeed flattens or partitions it, gradient clipping, the optimizer's temporaries):
# measured here, about 1.5x the model-state bytes, the buffer factor DeepSpeed's own estimators put on
# CPU memory (additional_buffer_factor=1.5).
CPU_BUFFER_FACTOR = 1.3


@dataclass(frozen=True)
class ModelFacts:
    """What memory depends on in a model, from a weightless copy."""

    parameters: int
    largest_layer: int
    num_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_heads: int
    gated_mlp: bool
    """SwiGLU-style MLP (Llama family): keeps four intermediate tensors per token, a GELU MLP two."""
    embedding_parameters: int


@dataclass(frozen=True)
class TrainingSetup:
    stage: int
    offload: str  # none, optimizer, full, nvme
    data: int
    pipeline: int
    tensor: int
    micro_batch: int
    grad_accum: int
    seq_len: int
    precision: str
    device: str  # cpu or cuda
    reduce_bucket: int
    eager_attention: bool = False
    sequence: int = 1
    """Ulysses degree: each rank holds 1/sequence of every sequence's tokens."""
    checkpointing: bool = False
    """Activation checkpointing of every decoder layer (train.activation_checkpointing=full)."""
    activation_offload: bool = False
    tiled_mlp: int = 0
    tiled_loss: int = 0


@dataclass
class Estimate:
    """Per-rank bytes by component and where they live."""

    device: dict[str, float] = field(default_factory=dict)
    host: dict[str, float] = field(default_factory=dict)

    @property
    def device_gb(self) -> float:
        return sum(self.device.values()) / GB

    @property
    def host_gb(self) -> float:
        return sum(self.host.values()) / GB


def dtype_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def shard_parameters(model: ModelFacts, layout: TrainingSetup) -> int:
    """Parameters a rank holds before ZeRO partitions them: its pipeline stage (the largest, which has
    the embedding or the head) sharded over the tensor-parallel ranks (embeddings are not sharded)."""
    per_layer = (model.parameters - model.embedding_parameters) / model.num_layers
    layers = -(-model.num_layers // layout.pipeline)  # the largest stage
    embeddings = model.embedding_parameters if layout.pipeline == 1 else model.embedding_parameters / 2
    return int(per_layer * layers / layout.tensor + embeddings)


def model_state_bytes(params: int, largest_layer: int, layout: TrainingSetup) -> tuple[float, float]:
    """(device bytes, offloaded bytes) of params, grads and optimizer states per rank; for 16-bit
    training at ZeRO-2/3 the same numbers as DeepSpeed's estimate_zero2/zero3_model_states_mem_needs
    (per GPU; their CPU figure is per node, times their 1.5 buffer factor)."""
    w, dp, stage = dtype_bytes(layout.precision), layout.data, layout.stage
    fp32_optimizer = 4 + 4 + 8  # fp32 master copy, fp32 gradients, Adam's two moments
    if stage == 0:  # fp32: the optimizer updates the params in place; 16-bit: DeepSpeed's fp32 copies
        return params * (w + w + (8 if w == 4 else fp32_optimizer)), 0.0
    if stage == 1:
        device, partitioned = params * (w + w), params * fp32_optimizer / dp
    elif stage == 2:
        device, partitioned = params * w, params * (w + fp32_optimizer) / dp
    else:
        device, partitioned = 4 * largest_layer, params * (w + fp32_optimizer) / dp
    if layout.offload == "none":
        return device + partitioned, 0.0
    if layout.offload == "optimizer":
        # The optimizer's fp32 part moves; ZeRO-2's 16-bit gradient partition goes with it (gradients
        # are reduced straight into CPU buffers), ZeRO-3's partitioned params stay on the device.
        kept = params * w / dp if stage == 3 else 0.0
        return device + kept, params * fp32_optimizer / dp
    return device, partitioned  # full / nvme (ZeRO-3): the partitioned params leave the device too


def activation_bytes(model: ModelFacts, layout: TrainingSetup) -> tuple[float, float]:
    """(bytes on the device, bytes in host memory) of the activations kept for the backward pass.

    Per token and layer (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
    Transformer Models"): about 9h tensors of the model width h (attention inputs, Q, K, V, its output,
    the norms, residuals) plus the MLP's intermediate tensors (4 of width i gated, 2 with GELU), in the
    training dtype; tensor parallelism shards the attention and MLP parts. Eager attention adds its
    a x s score and softmax matrices; SDPA kernels keep none; Hugging Face's layers keep
    HF_LAYER_FACTOR times as much. The output layer keeps fp32 logits, their log-softmax and both
    gradients (16 bytes per token and vocabulary entry).

    The levers: sequence parallelism leaves each rank 1/sequence of the tokens (attention's heads are
    split instead of the tokens, the same bytes); activation checkpointing keeps only each layer's
    input, plus one layer's activations while it is recomputed (the input moves to host memory with
    activation_offload); a tiled MLP keeps its input only and recomputes one tile at a time; a tiled
    loss holds one tile's logits. Under pipeline parallelism the first stage holds up to `pipeline`
    micro-batches in flight (1F1B schedule)."""
    w, t = dtype_bytes(layout.precision), layout.tensor
    h, i = model.hidden_size, model.intermediate_size
    mlp = (4 if model.gated_mlp else 2) * i * w * HF_LAYER_FACTOR / t
    one_tile = 0.0
    if layout.tiled_mlp > 1:
        mlp, one_tile = h * w, mlp / layout.tiled_mlp  # kept: the input; live: one tile's intermediates
    per_token_layer = (5 * h + 4 * h / t) * w * HF_LAYER_FACTOR + mlp
    if layout.eager_attention:
        per_token_layer += 2.5 * model.num_heads * layout.seq_len * w / t
    tokens = layout.micro_batch * layout.seq_len / layout.sequence
    layers = -(-model.num_layers // layout.pipeline)
    in_flight = min(layout.pipeline, layout.grad_accum) if layout.pipeline > 1 else 1
    live = tokens * one_tile + tokens * model.vocab_size * 16 / t / max(layout.tiled_loss, 1)  # + logits
    if not layout.checkpointing:
        return tokens * per_token_layer * layers * in_flight + live, 0.0
    layer_inputs = tokens * h * w * layers * in_flight
    device = tokens * per_token_layer + live  # one layer recomputed at a time
    if layout.activation_offload and layout.device == "cuda":
        return device, layer_inputs
    return device + layer_inputs, 0.0


def estimate(model: ModelFacts, layout: TrainingSetup, process_gb: float, local_ranks: int) -> Estimate:
    """Per-rank estimate; `process_gb` is the rank's memory before the model (imports, runtime)."""
    params = shard_parameters(model, layout)
    states_device, states_offloaded = model_state_bytes(params, model.largest_layer, layout)
    est = Estimate()
    w = dtype_bytes(layout.precision)
    # ZeRO-2/3's gradient bucket: filled up to reduce_bucket_size elements before each reduction
    # (ZeRO-1 reduces the gradients where they are, at the end of the step).
    bucket = min(layout.reduce_bucket, params) * w if layout.stage >= 2 else 0
    if layout.device == "cpu":
        if layout.stage == 3:
            # Gathered parameters are fresh tensors each step, freed into the allocator's cache, which
            # then holds about the whole model: the working set is all of it, not one layer.
            est.device["ZeRO-3 gathers"] = params * w
        # One memory: device and host are both this process's RSS.
        est.device["model states"] = CPU_BUFFER_FACTOR * (states_device + states_offloaded) \
            if layout.offload != "nvme" else CPU_BUFFER_FACTOR * states_device
        est.device["activations"] = sum(activation_bytes(model, layout))
        est.device["ZeRO buckets"] = bucket
        est.device["process"] = process_gb * GB + (CPU_SHM_ALLREDUCE_GB * GB * local_ranks if local_ranks > 1 else 0)
        return est
    est.device["model states"] = states_device
    activations, offloaded_activations = activation_bytes(model, layout)
    est.device["activations"] = activations
    est.device["ZeRO buckets"] = bucket
    est.device["CUDA reserve"] = GPU_RESERVE_GB * GB
    if offloaded_activations:
        est.host["offloaded activations"] = offloaded_activations
    if states_offloaded and layout.offload != "nvme":
        est.host["offloaded states"] = CPU_BUFFER_FACTOR * states_offloaded
    est.host["process"] = process_gb * GB
    return est
