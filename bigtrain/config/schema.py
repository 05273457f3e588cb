"""Typed schema of every bigtrain option; Hydra's YAML groups in conf/ fill it in."""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class LoraConfig:
    r: int = 0
    """Rank of the low-rank adapters; 0 turns LoRA off (every weight trains)."""
    alpha: float = 16.0
    """Adapter scaling (the update is alpha / r times the low-rank product)."""
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    """Layers that get adapters, by name (q_proj, v_proj, ...), or all-linear (every linear layer but the
    output head)."""


@dataclass
class ModelConfig:
    name: str = "tiny_llama"
    """Label used in logs and run directory names."""
    family: str = "llama"
    """Hugging Face `model_type` (llama, gpt2, mistral, qwen2, ...) used to build from `hf_config`."""
    pretrained: Optional[str] = None
    """Local Hugging Face model folder to load weights and config from (overrides family/hf_config)."""
    hf_config: Dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the `transformers` config class of `family`."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers (eager, sdpa, flash_attention_2)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Fine-tune with LoRA adapters (peft) instead of every weight."""


@dataclass
class DataConfig:
    name: str = "bundled"
    """Label of the data source (also names its cache folder)."""
    sources: List[Any] = field(default_factory=list)
    """data=prepared: folders written by `bigtrain prepare`, each a path or {path: FOLDER, weight: W};
    several are blended by weight. Empty: the source below, prepared into data.cache_dir."""
    builder: str = "json"
    """`datasets.load_dataset` path: a builder (json, text, parquet, csv) or a hub dataset name."""
    files: List[str] = field(default_factory=list)
    """Local data files for the builder; each must exist."""
    split: str = "train"
    format: str = "text"
    """text (pretraining: every token trained on), prompt_completion or chat (SFT: only the completion /
    the assistant turns are trained on); see bigtrain/components/data/formats.py."""
    text_field: str = "text"
    """format=text: the column holding the raw text."""
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    """format=chat: the column holding a list of {role, content} messages."""
    chat_template: Optional[str] = None
    """format=chat, for a tokenizer without a chat template of its own: a Jinja template (default: a
    simple `<|role|>` template, see formats.py)."""
    train_on_prompt: bool = False
    """SFT formats: train on every token, prompts and user turns included."""
    too_long: str = "truncate"
    """Whole-document samples (SFT formats, or packing=false) longer than train.seq_len: truncate or drop."""
    packing: bool = True
    """Pack documents into full train.seq_len samples; false: one document per sample, padded."""
    cross_document_attention: Optional[bool] = None
    """Whether packed documents attend to each other. Unset: yes for format=text (as GPT-style
    pretraining does), no for SFT formats (positions restart at every document)."""
    tokenizer: Optional[str] = None
    """Local tokenizer folder. Unset: the one data=prepared shards were made with, else model.pretrained's,
    else the bundled one."""
    cache_dir: Optional[str] = None
    """Where data=bundled/hf is prepared (default: ~/.cache/bigtrain/prepared)."""
    validation_fraction: float = 0.02
    """data=bundled/hf: share of documents held out for evaluation, chosen by document."""
    validation_seed: int = 1234
    """Seeds the choice of held-out documents (separate from `seed`, so the split stays when it changes)."""
    prepare_workers: int = 0
    """Tokenizer processes when preparing data=bundled/hf; 0: one per core."""
    max_samples: Optional[int] = None
    """Train on at most this many samples of each source (the first ones); unset: all of them."""


@dataclass
class EvalConfig:
    interval: int = 100
    """Evaluate on held-out data every this many steps (and at the end of training); 0 turns it off."""
    batches: int = 10
    """Global batches (micro_batch_size x data-parallel ranks samples each) per evaluation."""
    sources: List[Any] = field(default_factory=list)
    """Prepared folders to evaluate on (same form as data.sources; their validation split if they have
    one); empty: the training data's validation split."""


@dataclass
class ZeroConfig:
    stage: int = 2
    """ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+gradients), 3 (+parameters)."""
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000


@dataclass
class OffloadConfig:
    name: str = "none"
    optimizer: str = "none"
    """Where optimizer states live: none (on the device), cpu, nvme."""
    param: str = "none"
    """Where parameters live between uses (ZeRO-3 only): none, cpu, nvme."""
    nvme_path: Optional[str] = None
    """Folder on a fast local disk for nvme offload."""
    pin_memory: Optional[bool] = None
    """Page-locked host buffers: faster host-device copies on a GPU, no gain on a CPU-only machine.
    Unset: on when training on GPUs, off on the CPU."""
    sub_group_size: Optional[int] = None
    """Elements of optimizer state processed (and, on NVMe, held in RAM) at a time; unset: DeepSpeed's
    1e9, which for NVMe offload means 16 GB of fp32 weights, gradients and moments in RAM at once."""
    max_in_cpu: Optional[int] = None
    """NVMe parameter offload: parameter elements kept in RAM (unset: DeepSpeed's 1e9, 4 GB in fp32)."""


@dataclass
class PrecisionConfig:
    name: str = "fp32"
    """Training precision: fp32, bf16 (mixed, fp32 master weights) or fp16 (mixed, loss scaling)."""


@dataclass
class ParallelConfig:
    pipeline: int = 1
    """Pipeline-parallel degree: the model is cut into this many stages, one per rank of a pipeline
    (DeepSpeed PipelineModule; ZeRO-0 or -1). Micro-batches per step: train.grad_accum."""
    tensor: int = 1
    """Tensor-parallel degree: every weight matrix is sharded over this many ranks (DeepSpeed AutoTP)."""
    pipeline_partition: str = "parameters"
    """How layers are assigned to pipeline stages: parameters (balance parameter counts), uniform
    (balance layer counts) or type:REGEX (balance layers whose class name matches, e.g.
    type:DecoderLayer)."""
    sequence: int = 1
    """Sequence-parallel degree (Ulysses, through DeepSpeed): every sequence is split over this many ranks,
    which exchange heads for sequence around attention. Llama-family models."""


@dataclass
class CommConfig:
    name: str = "none"
    """How the data-parallel gradient exchange is done: none (DeepSpeed's all-reduce as configured),
    fp16_reduce / bf16_reduce (DeepSpeed's, in 16 bits), zeropp (ZeRO++ on ZeRO-3), or bigtrain's own
    compressed exchange at ZeRO-0: onebit (signs + block scales, error feedback), powersgd (low-rank,
    error feedback), local_sgd (average the replicas every sync_every steps)."""
    count_bytes: bool = False
    """Count the bytes each rank sends through DeepSpeed's collectives (its comms logger) and log
    them as comm_bytes in metrics.jsonl. Off by default: the logger waits for every collective to
    finish, which on a GPU takes away the overlap of communication with the backward pass."""
    warmup_steps: int = 0
    """onebit, powersgd, local_sgd: steps trained with DeepSpeed's plain all-reduce before compression
    starts (as 1-bit Adam's warm-up); these steps are exactly those of comm=none."""
    error_feedback: bool = True
    """onebit, powersgd: add what compression dropped from this step's gradient to the next one."""
    low_rank: int = 4
    """powersgd: rank of each gradient matrix's approximation."""
    sync_every: int = 8
    """local_sgd: steps each rank trains on its own before the replicas are averaged."""
    outer_optimizer: str = "none"
    """local_sgd: none (replace each replica by the average) or nesterov (DiLoCo: SGD with Nesterov
    momentum on the averaged change since the last sync)."""
    outer_lr: float = 0.7
    """local_sgd with outer_optimizer=nesterov: learning rate of the outer step."""
    outer_momentum: float = 0.9
    """local_sgd with outer_optimizer=nesterov: momentum of the outer step."""
    quantized_weights: bool = False
    """zeropp: all-gather parameters in int8 (qwZ); needs a GPU."""
    quantized_gradients: bool = False
    """zeropp: reduce gradients with an int4 all-to-all (qgZ); DeepSpeed uses it only across nodes."""
    hpz_partition_size: int = 1
    """zeropp: ranks holding a secondary copy of the parameters, for backward all-gathers within a
    node (hpZ); 1 turns it off, 0 means the ranks of one node (the launcher's local world size)."""


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 1e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    no_decay: List[str] = field(default_factory=lambda: ["bias", "norm", "embed"])
    """Parameters trained without weight decay: a regular expression (case-insensitive) matching a
    parameter's name or its module's class name. The defaults exempt biases, every norm's weight and
    every embedding table (a tied output head included); [] decays every parameter."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 turns clipping off."""


@dataclass
class SchedulerConfig:
    name: str = "warmup_cosine"
    """warmup_cosine (linear warm-up, cosine decay to min_lr_ratio * lr), wsd (warm-up, stable, decay over
    the last decay_fraction of the steps) or constant."""
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    """wsd: share of train.max_steps, at the end, over which the learning rate decays."""
    decay_shape: str = "linear"
    """wsd: linear or cosine decay."""


@dataclass
class TrainConfig:
    max_steps: int = 200
    """Optimizer steps to train for."""
    micro_batch_size: int = 8
    """Sequences per rank per forward pass."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    seq_len: int = 128
    """Tokens per training sequence."""
    global_batch_size: Optional[int] = None
    """Sequences per optimizer step over all ranks. When set it must equal
    micro_batch_size * grad_accum * data-parallel ranks; leave unset to derive it."""
    device: str = "auto"
    """auto (GPU when one is visible, else CPU), cpu or cuda."""
    activation_checkpointing: str = "none"
    """none, or full: keep only each decoder layer's input and recompute its activations in the backward
    pass (non-reentrant), trading about a third more compute for most of the activation memory."""
    activation_offload: bool = False
    """With activation_checkpointing=full: hold the kept layer inputs in pinned host memory instead of on
    the GPU (pays on GPUs at long sequences; a copy each way per layer). Not with pipeline parallelism."""
    tiled_mlp: int = 0
    """Compute every MLP block in this many pieces of the sequence (DeepSpeed's TiledMLP); 0: whole."""
    tiled_loss: int = 0
    """Compute the output logits and the loss in this many pieces of the sequence; 0: whole."""


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints"
    """Checkpoint folder, relative to run_dir unless absolute."""
    interval: int = 0
    """Save every this many steps; 0 saves only at the end."""
    save_final: bool = True
    """Save when the run reaches train.max_steps. Off for throughput and memory benchmarks, where a
    multi-GB save would only cost time (a stop on a signal still saves)."""
    keep: int = 3
    """Keep this many newest checkpoints."""
    resume: str = "auto"
    """auto (newest valid checkpoint in the checkpoint folder, else start fresh), never, or the path
    of one step_* checkpoint folder."""
    verify_checksums: bool = True
    """On resume, check every file's SHA-256 against the manifest (sizes are always checked)."""


@dataclass
class LoggingConfig:
    interval: int = 10
    """Log metrics every this many steps (the first and last step are always logged)."""
    tensorboard: bool = True
    """Write TensorBoard events under run_dir/tensorboard."""
    progress: bool = True
    """Show progress on rank 0: a step line at every logged step with the time left (ETA), and on a
    terminal also a progress bar updated every step."""
    deepspeed_level: str = "warning"
    """Level of DeepSpeed's own log messages (debug, info, warning, error)."""
    step_breakdown: bool = True
    """Split each step's time into data wait, forward, backward and optimizer step. On a GPU the phases
    are timed with CUDA events, read once per logged step: the device is not synchronized per phase."""
    peak_tflops: Optional[float] = None
    """Peak TFLOP/s of one device in the training precision, the denominator of MFU. Unset: a known
    GPU's datasheet figure, else a matmul measured at start-up (see README, Monitoring)."""
    csv: bool = False
    """Also write DeepSpeed's CSV monitor: one `<metric>.csv` file per metric under run_dir/csv."""
    wandb: bool = False
    """Also log to Weights & Biases (needs `pip install 'bigtrain[wandb]'`); files go to run_dir/wandb."""
    wandb_mode: str = "offline"
    """offline (write locally, no network; `wandb sync` uploads later) or online."""
    wandb_project: str = "bigtrain"
    """W&B project the run is logged under."""
    wandb_group: Optional[str] = None
    """W&B group, e.g. to gather the trials of a sweep."""
    flops_profile_step: int = 0
    """Profile this step (1-based) with DeepSpeed's flops profiler, written to
    run_dir/flops_profile.txt; 0 turns it off. ZeRO stages 0-2 (its counts are wrong under ZeRO-3)."""


@dataclass
class SweepConfig:
    ranks: int = 1
    """Processes per sweep trial (`bigtrain sweep`): 1 trains in the sweep's own process; more
    launch each trial with `deepspeed --num_gpus N`."""
    metric: str = "loss"
    """metrics.jsonl field whose last logged value is the trial's result, returned to the sweeper
    (set hydra.sweeper.direction=maximize for a field such as tokens_per_s)."""


@dataclass
class FaultConfig:
    collective_timeout_s: float = 600.0
    """Longest a collective may block before the process group gives up; bounds how long a crashed
    peer can stall the others (gloo's own default is 30 minutes)."""
    hang_timeout_s: float = 300.0
    """End the job (exit 124, with run_dir/hang_report.txt) when no rank makes progress for this
    long, or one rank stops answering; 0 turns the watchdog off."""
    straggler_factor: float = 1.5
    """Report a rank whose compute time per step exceeds the median rank's by this factor."""
    max_nonfinite_steps: int = 5
    """Stop the run after this many consecutive steps skipped for a NaN/Inf loss or gradient norm."""
    max_overflow_steps: int = 50
    """fp16: stop the run after this many consecutive steps skipped for overflowing gradients (the loss
    scale keeps falling: the run has diverged)."""


@dataclass
class BigtrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    seed: int = 1234
    """Seeds model init, data order and dropout."""
    run_dir: Optional[str] = None
    """Folder shared by all ranks for logs, metrics and checkpoints. Unset: runs/<overrides>."""
    deepspeed: Dict[str, Any] = field(default_factory=dict)
    """Extra DeepSpeed config merged last into the derived config, for options bigtrain has no key for."""


def register_schema() -> None:
    ConfigStore.instance().store(name="bigtrain_schema", node=BigtrainConfig)
