"""ALST tiling (DeepSpeed's ulysses_sp.py): compute a long sequence's MLP, and its logits and loss, a
piece of the sequence at a time, so that the full-width intermediate tensors (the MLP's inner width,
the vocabulary's logits) never exist for the whole sequence at once. The pieces are recomputed in the
backward pass; the result is the same computation, summed in another order.

    train.tiled_mlp=N    every MLP block in N pieces (TiledMLP)
    train.tiled_loss=N   the output projection and the loss in N pieces (sequence_tiled_compute)

N is fixed by the config, so every rank runs the same pieces (under ZeRO-3 each piece gathers the
weights it uses, a collective all ranks must join).
"""

import types

import torch
import torch.nn.functional as F

from bigtrain.components.data.prepared import IGNORE


def tile_mlps(model: torch.nn.Module, shards: int) -> int:
    """Run every MLP block of `model` (a module whose class name ends in MLP) in `shards` pieces of the
    sequence; returns how many blocks were tiled."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    tiled = 0
    for module in model.modules():
        if type(module).__name__.endswith("MLP") and not hasattr(module, "_untiled_forward"):
            module._untiled_forward = module.forward

            def tiled_forward(self, hidden: torch.Tensor) -> torch.Tensor:
                return TiledMLP.apply(lambda mlp, x: mlp._untiled_forward(x), self, hidden, shards,
                                      list(self.parameters()))

            module.forward = types.MethodType(tiled_forward, module)
            tiled += 1
    return tiled


def tiled_loss(model, batch: dict[str, torch.Tensor], shards: int, num_items: int) -> torch.Tensor:
    """The causal-LM loss of `batch` (sum of its token losses over `num_items`), with the logits computed
    and reduced `shards` pieces of the sequence at a time."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import sequence_tiled_compute

    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps it
    head, embed = hf_model.get_output_embeddings(), hf_model.get_input_embeddings()
    embeddings = embed(batch["input_ids"])
    tied = head.weight is embed.weight
    if tied and head.weight.requires_grad and torch.is_grad_enabled():
        hold_reduction_until_embedding(head.weight, embeddings)
    hidden = hf_model.get_decoder()(inputs_embeds=embeddings, position_ids=batch["position_ids"],
                                    use_cache=False).last_hidden_state
    shifted = batch.get("shift_labels")
    if shifted is None:
        labels = batch["labels"]
        shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)

    def loss_sum(hidden_states, shift_labels, head):
        logits = head(hidden_states).float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE,
                               reduction="sum")

    total = sequence_tiled_compute(
        loss_sum, hidden.shape[1], shards, kwargs_to_shard={"hidden_states": hidden, "shift_labels": shifted},
        kwargs_to_pass={"head": head}, grad_requiring_tensor_key="hidden_states",
        compute_params=[] if tied else [head.weight],
        output_unshard_dimension=0, output_reduction="sum",
    )
    return total / num_items


def hold_reduction_until_embedding(weight: torch.nn.Parameter, embeddings: torch.Tensor) -> None:
    """A tied output head's weight gets gradient from every piece of the tiled loss and then, last in the
    backward pass, from the embedding lookup. ZeRO 1-3 reduce a weight's gradient once per backward pass,
    when its flag `ds_grad_is_ready` says it is complete (sequence_tiled_compute sets it at the last
    piece, too early here: the embedding's share would be a second reduction, which ZeRO refuses). So the
    flag stays down through the pieces and goes up when the embedding output's gradient arrives, just
    before the embedding adds its share."""
    weight.ds_grad_is_ready = False

    def ready(grad: torch.Tensor) -> torch.Tensor:
        weight.ds_grad_is_ready = True
        return grad

    embeddings.register_hook(ready)
