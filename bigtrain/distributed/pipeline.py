"""Pipeline parallelism: a Hugging Face causal LM as a DeepSpeed PipelineModule.

The model is cut into a flat list of layers that pass one tensor (the hidden states) from one to the
next: token embedding, (GPT-2: position embedding,) every decoder block, the final norm, the output
head. DeepSpeed assigns contiguous runs of them to the stages (`parallel.pipeline_partition`). A head
that shares its weight with the token embedding (GPT-2, tied Llamas) is a tied layer: the first and
last stage each hold a copy and DeepSpeed sums their gradients.

Each rank builds the whole model first (seeded, so every stage starts from the weights a single
process would have), keeps its stage's layers, and frees the rest.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from transformers import PreTrainedModel
from transformers.masking_utils import create_causal_mask

from bigtrain.components.models import has_tied_output
from bigtrain.errors import ConfigError

TIED_EMBEDDING = "embed_tokens"


def position_ids_for(hidden: torch.Tensor) -> torch.Tensor:
    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)


def causal_mask_for(config, hidden: torch.Tensor, position_ids: torch.Tensor):
    """The mask the HF model itself would build for a full, unpadded sequence (None where the
    attention kernel applies causality on its own, as SDPA does)."""
    return create_causal_mask(
        config=config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=position_ids
    )


class TokenEmbedding(nn.Module):
    """input_ids -> embeddings. Under a tied head the last stage holds a copy (see `tied_head`)."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.embedding = embedding

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids)


def tied_head(module: TokenEmbedding, hidden: torch.Tensor) -> torch.Tensor:
    """The output head of a tied model: logits through the token embedding's own weight."""
    return F.linear(hidden, module.embedding.weight)


class LearnedPositions(nn.Module):
    """GPT-2: add learned position embeddings, then embedding dropout."""

    def __init__(self, positions: nn.Embedding, dropout: nn.Dropout):
        super().__init__()
        self.positions = positions
        self.dropout = dropout

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.dropout(hidden + self.positions(position_ids_for(hidden)))


class RotaryDecoderLayer(nn.Module):
    """A Llama-family decoder block; rotary position embeddings and the causal mask are recomputed
    on its stage (cheap, and they need not travel between stages)."""

    def __init__(self, block: nn.Module, rotary: nn.Module, config):
        super().__init__()
        self.block = block
        self.rotary = rotary
        self.config = config

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        position_ids = position_ids_for(hidden)
        return self.block(
            hidden,
            attention_mask=causal_mask_for(self.config, hidden, position_ids),
            position_ids=position_ids,
            position_embeddings=self.rotary(hidden, position_ids=position_ids),
        )


class GPT2DecoderLayer(nn.Module):
    """A GPT-2 block (positions were added at the embedding)."""

    def __init__(self, block: nn.Module, config):
        super().__init__()
        self.block = block
        self.config = config

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        position_ids = position_ids_for(hidden)
        return self.block(hidden, attention_mask=causal_mask_for(self.config, hidden, position_ids),
                          position_ids=position_ids)


class Head(nn.Module):
    """Final norm, then the output projection when it has a weight of its own."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module | None):
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(hidden)
        return hidden if self.lm_head is None else self.lm_head(hidden)


@dataclass(frozen=True)
class PipeLayer:
    """One entry of the layer list: the module type and arguments DeepSpeed builds it from, and for
    each of its children the prefix of the same weights in the Hugging Face model (how export maps a
    pipeline checkpoint back)."""

    cls: type
    args: tuple
    hf_prefixes: dict[str, str]
    tied: bool = False

    def spec(self, is_head: bool):
        from deepspeed.pipe import LayerSpec, TiedLayerSpec

        if not self.tied:
            return LayerSpec(self.cls, *self.args)
        return TiedLayerSpec(TIED_EMBEDDING, self.cls, *self.args, forward_fn=tied_head if is_head else None,
                             tied_weight_attr=["embedding.weight"])


# Families whose decoder-only structure the layer lists below follow exactly.
ROTARY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_FAMILIES = (*ROTARY_FAMILIES, "gpt2")


def check_pipeline_support(family: str) -> None:
    if family not in SUPPORTED_FAMILIES:
        raise ConfigError(
            f"parallel.pipeline>1 splits a model into stages layer by layer, which bigtrain knows how "
            f"to do for the model families {', '.join(SUPPORTED_FAMILIES)}; model.family={family!r} is "
            "not one of them. Use parallel.pipeline=1 with ZeRO-3 (zero=stage3) to spread the model "
            "over ranks instead."
        )


def pipe_layers(model: PreTrainedModel) -> list[PipeLayer]:
    """The model as a flat list of layers; the last one returns logits. The modules are the HF
    model's own, so a layer built from its entry starts from the model's weights."""
    family = model.config.model_type
    check_pipeline_support(family)
    tied = has_tied_output(model)
    if family == "gpt2":
        base, prefix = model.transformer, "transformer"
        layers = [
            PipeLayer(TokenEmbedding, (base.wte,), {"embedding": f"{prefix}.wte"}, tied=tied),
            PipeLayer(LearnedPositions, (base.wpe, base.drop), {"positions": f"{prefix}.wpe"}),
        ]
        layers += [PipeLayer(GPT2DecoderLayer, (block, model.config), {"block": f"{prefix}.h.{i}"})
                   for i, block in enumerate(base.h)]
        norm, norm_prefix = base.ln_f, f"{prefix}.ln_f"
    else:
        base, prefix = model.model, "model"
        layers = [PipeLayer(TokenEmbedding, (base.embed_tokens,), {"embedding": f"{prefix}.embed_tokens"}, tied=tied)]
        layers += [PipeLayer(RotaryDecoderLayer, (block, base.rotary_emb, model.config), {"block": f"{prefix}.layers.{i}"})
                   for i, block in enumerate(base.layers)]
        norm, norm_prefix = base.norm, f"{prefix}.norm"
    if tied:  # the logits come from the token embedding's weight, held again by the last stage
        layers.append(PipeLayer(Head, (norm, None), {"norm": norm_prefix}))
        layers.append(PipeLayer(TokenEmbedding, layers[0].args, {}, tied=True))
    else:
        layers.append(PipeLayer(Head, (norm, model.lm_head), {"norm": norm_prefix, "lm_head": "lm_head"}))
    return layers


class TokenAveragedLoss:
    """The pipeline's loss function: the HF model's own causal-LM loss of a micro-batch, summed over its
    tokens and divided by the whole step's token count, times `scale` (runtime/steps.py says why).
    The trainer sets both before each step (the last stage alone computes it)."""

    def __init__(self, loss_function, vocab_size: int):
        self.loss_function = loss_function
        self.vocab_size = vocab_size
        self.num_items, self.scale = 1, 1.0

    def set_step(self, num_items: int, scale: float) -> None:
        self.num_items, self.scale = num_items, scale

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.vocab_size,
                                  num_items_in_batch=self.num_items)
        return loss * self.scale


def build_pipeline_module(model: PreTrainedModel, cfg: DictConfig):
    """The DeepSpeed PipelineModule for `model` with cfg.parallel's degree, partitioning and
    activation checkpointing; its loss function is a TokenAveragedLoss."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.activation_checkpointing.checkpointing import non_reentrant_checkpoint

    layers = pipe_layers(model)
    specs = [layer.spec(is_head=i == len(layers) - 1) for i, layer in enumerate(layers)]
    pipe = PipelineModule(
        layers=specs,
        num_stages=cfg.parallel.pipeline,
        loss_fn=TokenAveragedLoss(model.loss_function, model.config.vocab_size),
        partition_method=cfg.parallel.pipeline_partition,
        activation_checkpoint_interval=1 if cfg.train.activation_checkpointing == "full" else 0,
        # DeepSpeed's default (reentrant) checkpoint fails on the embedding stage, whose input
        # (token ids) needs no gradient.
        activation_checkpoint_func=non_reentrant_checkpoint,
    )
    _release_other_stages(pipe, layers)
    return pipe


def _release_other_stages(pipe, layers: list[PipeLayer]) -> None:
    """Free the weights of layers that live on other stages: each rank built the whole model, and
    the layer specs would otherwise keep all of it alive."""
    kept = {id(m) for m in pipe.modules()}
    for layer in layers:
        for arg in layer.args:
            if not isinstance(arg, nn.Module):
                continue
            for module in arg.modules():
                if id(module) in kept:
                    continue
                for name, param in module.named_parameters(recurse=False):
                    module._parameters[name] = nn.Parameter(param.to("meta"), param.requires_grad)
                for name, buffer in module.named_buffers(recurse=False):
                    module._buffers[name] = buffer.to("meta")


def layer_type_names(family: str, num_layers: int) -> list[str]:
    """The class name of each layer a model of `family` with `num_layers` blocks is cut into: what
    `parallel.pipeline_partition=type:REGEX` matches against."""
    check_pipeline_support(family)
    if family == "gpt2":
        front, decoder = [TokenEmbedding, LearnedPositions], GPT2DecoderLayer
    else:
        front, decoder = [TokenEmbedding], RotaryDecoderLayer
    return [cls.__name__ for cls in (*front, *[decoder] * num_layers, Head)]


def hf_state_dict_from_layers(tag_dir, model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The HF state dict of a pipeline checkpoint: DeepSpeed writes one file per layer
    (layer_NN-model_states.pt, keyed by the pipe layer's own children), mapped back through the
    prefixes `pipe_layers` recorded. `model` may be weightless (meta): only its structure is read."""
    state = {}
    for index, layer in enumerate(pipe_layers(model)):
        path = tag_dir / f"layer_{index:02d}-model_states.pt"
        if not layer.hf_prefixes:  # the tied head: its weight is the embedding's, saved at layer 0
            continue
        for key, tensor in torch.load(path, map_location="cpu", weights_only=True).items():
            child, _, rest = key.partition(".")
            if child in layer.hf_prefixes:  # other children (rotary tables) are derived, not weights
                state[f"{layer.hf_prefixes[child]}.{rest}"] = tensor.float()
    return state
