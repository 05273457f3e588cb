"""Ulysses sequence parallelism for Hugging Face models, through DeepSpeed's ALST helpers
(deepspeed/runtime/sequence_parallel/ulysses_sp.py): each of the S ranks of a sequence group holds
1/S of every sequence; around attention an all-to-all turns that into all of the sequence for 1/S of
the heads, and back.

bigtrain's part:
- registering DeepSpeed's attention wrapper (UlyssesSPAttentionHF.register_with_transformers) and
  handing the engine its groups (mpu), with tensor parallelism stated as 1 so that checkpoints record
  the layout they have (DeepSpeed would otherwise take the sequence group for a tensor group, and its
  universal conversion would then fail);
- cutting each batch: the labels are shifted first (a shard's last token predicts the next shard's
  first), then input_ids, position_ids and the shifted labels are sliced along the sequence;
- putting transformers' attention function back when the run ends (the registration replaces it for
  the whole process).

Sequence groups are consecutive ranks (rank // S is the data-parallel rank). The loss of a rank is
its tokens' losses over the whole step's token count: the sequence group's ranks together hold every
token, and their gradients add up (ZeRO 0-2) or are averaged with the data-parallel ranks (ZeRO-3,
which the trainer's gradient scale accounts for).
"""

import types

import torch
from omegaconf import DictConfig

from bigtrain.components.data.prepared import IGNORE
from bigtrain.errors import ConfigError

# Model families whose attention runs through transformers' attention-function table with
# num_key_value_heads in their config: what DeepSpeed's wrapper needs. GPT-2 has neither the config
# key nor the output shape it returns (measured: a shape error in c_proj).
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def check_sequence_parallel(cfg: DictConfig, model_config) -> None:
    """Refuse, before any rank starts, what Ulysses cannot split."""
    sp, name = cfg.parallel.sequence, cfg.model.name
    family = model_config.model_type
    if family not in SUPPORTED_FAMILIES:
        raise ConfigError(
            f"parallel.sequence={sp} with model family {family!r}: DeepSpeed's Ulysses attention works through "
            f"transformers' attention table for {', '.join(SUPPORTED_FAMILIES)}; GPT-2's attention has no key/value "
            "head count and reshapes the output itself. Use a Llama-family model, or parallel.sequence=1."
        )
    if cfg.model.attn_implementation not in SUPPORTED_ATTENTION:
        raise ConfigError(
            f"parallel.sequence={sp} with model.attn_implementation={cfg.model.attn_implementation}: Ulysses drops "
            "the attention mask and needs a kernel that applies causality itself. Use sdpa (or flash_attention_2/3)."
        )
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", heads)
    if heads % sp:
        raise ConfigError(
            f"parallel.sequence={sp} must divide the attention heads: model {name} has {heads}, and each rank of a "
            f"sequence group attends with heads / {sp} of them. Use a parallel.sequence that divides {heads}."
        )
    if kv_heads % sp and sp % kv_heads:
        raise ConfigError(
            f"parallel.sequence={sp} and model {name}'s {kv_heads} key/value heads: one must divide the other "
            "(DeepSpeed replicates key/value heads across the group only then). Pick such a parallel.sequence."
        )
    if cfg.train.seq_len % sp:
        raise ConfigError(
            f"train.seq_len={cfg.train.seq_len} is not divisible by parallel.sequence={sp}: every rank of a sequence "
            f"group holds an equal share. Use a train.seq_len that is a multiple of {sp}."
        )


class SequenceParallel:
    """The sequence group of this rank, for one run."""

    def __init__(self, cfg: DictConfig, model: torch.nn.Module):
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self.attention = cfg.model.attn_implementation
        self._original_attention = ALL_ATTENTION_FUNCTIONS[self.attention]
        groups = UlyssesSPAttentionHF.register_with_transformers(
            model_name_or_path=model, core_attn_implementation=self.attention,
            sequence_parallel_size=cfg.parallel.sequence, micro_batch_size=cfg.train.micro_batch_size,
            seq_length=cfg.train.seq_len, seq_length_is_variable=False,
        )
        self.size = groups.get_sequence_parallel_world_size()
        self.rank = groups.get_sequence_parallel_rank()
        # The engine's model-parallel unit: these groups, with tensor parallelism 1 (see the module doc).
        self.mpu = types.SimpleNamespace(**{k: getattr(groups, k) for k in dir(groups) if not k.startswith("_")})
        self.mpu.get_tensor_model_parallel_world_size = lambda: 1
        self.mpu.get_tensor_model_parallel_rank = lambda: 0

    def shard(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's slice of each sequence of `batch`, with the labels already shifted (`shift_labels`:
        what transformers' loss takes instead of labels to shift)."""
        labels = batch["labels"]
        shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)
        width = labels.shape[1] // self.size
        part = slice(self.rank * width, (self.rank + 1) * width)
        shifted = shifted[:, part].contiguous()
        # transformers computes a loss only when given labels; given shift_labels too, it uses those as they are.
        return {"input_ids": batch["input_ids"][:, part].contiguous(),
                "position_ids": batch["position_ids"][:, part].contiguous(),
                "labels": shifted, "shift_labels": shifted}

    def close(self) -> None:
        """Give transformers its attention function back and DeepSpeed's sequence groups up, so that a later
        run in this process (the Python API, a sweep) starts without them."""
        from deepspeed.runtime.sequence_parallel import parallel_state_sp
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        ALL_ATTENTION_FUNCTIONS[self.attention] = self._original_attention
        parallel_state_sp._release_sequence_parallel_groups()
