"""Fine-tuning: loss masks of the SFT formats, packing that keeps documents apart, a loss averaged over
the tokens of the global batch, LoRA at ZeRO-2 and ZeRO-3, no weight decay for norms and embeddings,
the warmup-stable-decay schedule, and chat data refused before any rank starts (issue 16).

Everything runs in fp32 on the CPU with the tiny models; runs that need ranks use the kept rank pool.
"""

import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import pool_train, read_metrics
from engine_logits import fixed_batch
from finetune_reference import reference_steps, wsd_multiplier

from bigtrain.components.data.loader import BatchLoader, BatchPlan, label_positions
from bigtrain.components.data.prepare import prepare
from bigtrain.components.data.prepared import IGNORE, PreparedSplit, Samples, Shaping
from bigtrain.components.data.sources import ensure_prepared, open_samples, training_sources
from bigtrain.components.data.tokenizer import load_tokenizer
from bigtrain.components.lr_schedule import build_scheduler
from bigtrain.components.models import build_model, special_token_ids
from bigtrain.components.optimizer import parameter_groups
from bigtrain.config import compose

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "finetune"


@pytest.fixture(autouse=True)
def one_thread():
    """This process's own computations (references, single forwards) are small: one thread runs them
    fastest when the cores are shared with the ranks and other work; the setting is put back after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sft_data(path: Path, data_format: str, cache: Path) -> list[str]:
    return ["data=hf", "data.builder=json", f"data.files=[{path}]", f"data.format={data_format}",
            f"data.cache_dir={cache}", "data.prepare_workers=1"]


# ------------------------------------------------------------------------- 1. label masks

# The bundled tokenizer's pieces of each fixture record, written out by hand, with 1 under every
# token the loss is taken on. prompt_completion: the completion and the end-of-text after it.
PROMPT_COMPLETION_MASKS = [
    [("What", 0), (" is", 0), (" a", 0), (" cat", 0), ("?", 0),
     (" An", 1), (" animal", 1), (".", 1), ("<|endoftext|>", 1)],
    [("D", 0), ("ef", 0), ("ine", 0), (" the", 0), (" word", 0), (" fool", 0), (".", 0),
     (" A", 1), (" person", 1), (" who", 1), (" tr", 1), ("ust", 1), ("s", 1), (".", 1), ("<|endoftext|>", 1)],
    [("S", 0), ("ay", 0), (" y", 0), ("es", 0), (".", 0),
     (" Y", 1), ("es", 1), ("<|endoftext|>", 1)],
]

# chat, with the default template (the bundled tokenizer has none): every turn is `<|role|>`, a line
# break, its text; turns are separated by a line break; an assistant turn ends with end-of-text. Only
# the assistant's text and its end-of-text are trained on: not the role markers, not the separators.
USER, ASSISTANT, SYSTEM = ([("<", 0), ("|", 0), *role, ("|", 0), (">", 0), ("\n", 0)]
                           for role in ([("user", 0)], [("ass", 0), ("ist", 0), ("ant", 0)], [("system", 0)]))
CHAT_MASKS = [
    [*USER, ("H", 0), ("ell", 0), ("o", 0), ("\n", 0),
     *ASSISTANT, ("H", 1), ("i", 1), (" there", 1), ("<|endoftext|>", 1)],
    [*SYSTEM, ("B", 0), ("e", 0), (" b", 0), ("rief", 0), (".", 0), ("\n", 0),
     *USER, ("N", 0), ("ame", 0), (" a", 0), (" color", 0), (".", 0), ("\n", 0),
     *ASSISTANT, ("R", 1), ("ed", 1), (".", 1), ("<|endoftext|>", 1), ("\n", 0),
     *USER, ("An", 0), ("other", 0), ("?", 0), ("\n", 0),
     *ASSISTANT, ("B", 1), ("l", 1), ("ue", 1), (".", 1), ("<|endoftext|>", 1)],
]


def prepared_documents(tmp_path: Path, fixture: str, data_format: str, *extra: str):
    """(tokenizer, [(token ids, mask)] of every document, the prepared folder) of a fixture prepared as a
    run would, every document in the training split."""
    cfg = compose([*sft_data(FIXTURES / fixture, data_format, tmp_path), *extra])
    out = tmp_path / "prepared"
    prepare(cfg.data, out, workers=1, validation_fraction=0.0, progress=False)
    split = PreparedSplit(out, "train")
    docs = []
    for start, end in zip(split.doc_starts[:-1], split.doc_starts[1:]):
        mask = split.mask[start:end].tolist() if split.mask is not None else None
        docs.append((split.tokens[start:end].tolist(), mask))
    return load_tokenizer(cfg.data.tokenizer), docs, out


@pytest.mark.parametrize("fixture,data_format,expected", [
    ("prompt_completion.jsonl", "prompt_completion", PROMPT_COMPLETION_MASKS),
    ("chat.jsonl", "chat", CHAT_MASKS),
], ids=["prompt_completion", "chat"])
def test_label_masks_are_the_hand_written_ones(tmp_path, fixture, data_format, expected):
    tokenizer, docs, out = prepared_documents(tmp_path, fixture, data_format)
    assert len(docs) == len(expected)
    for (ids, mask), want in zip(docs, expected):
        assert [tokenizer.decode([i]) for i in ids] == [piece for piece, _ in want]
        assert mask == [trained for _, trained in want]
    # The labels a run trains on: one document per sample (no packing), prompt tokens and padding ignored.
    samples = Samples(PreparedSplit(out, "train"), Shaping(seq_len=64, packing=False, whole_documents=True,
                                                           cross_document_attention=False, drop_too_long=False,
                                                           pad_id=tokenizer.pad_token_id))
    for index, (ids, mask) in enumerate(docs):
        sample = samples.sample(index)
        expected_labels = [i if m else IGNORE for i, m in zip(ids, mask)] + [IGNORE] * (64 - len(ids))
        assert sample["labels"].tolist() == expected_labels
        assert sample["input_ids"][: len(ids)].tolist() == ids


def test_train_on_prompt_trains_on_every_token(tmp_path):
    tokenizer, docs, out = prepared_documents(tmp_path, "chat.jsonl", "chat", "data.train_on_prompt=true")
    assert [[tokenizer.decode([i]) for i in ids] for ids, _ in docs] == [[p for p, _ in want] for want in CHAT_MASKS]
    assert all(mask is None for _, mask in docs)  # no mask file
    samples = Samples(PreparedSplit(out, "train"), Shaping(seq_len=64, packing=False, whole_documents=True,
                                                           cross_document_attention=False, drop_too_long=False,
                                                           pad_id=tokenizer.pad_token_id))
    for index, (ids, _) in enumerate(docs):
        assert samples.sample(index)["labels"][: len(ids)].tolist() == ids


# ------------------------------------------------------------------ 2. packing keeps documents apart


def write_prompt_completion(path: Path, records: int, seed: int) -> Path:
    """Records whose prompts and completions vary in length (1 to 14 words), so samples, micro-batches
    and ranks hold different numbers of trained-on tokens."""
    rng = random.Random(seed)
    words = "the cat sat on a mat and then it ran far away from every dog in town".split()
    with path.open("w") as f:
        for _ in range(records):
            prompt = " ".join(rng.choices(words, k=rng.randint(1, 8)))
            completion = " ".join(rng.choices(words, k=rng.randint(1, 14)))
            f.write(json.dumps({"prompt": prompt.capitalize() + "?", "completion": " " + completion + "."}) + "\n")
    return path


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sft")
    return write_prompt_completion(folder / "pairs.jsonl", 160, seed=5), folder / "cache"


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])
def test_packed_logits_equal_each_document_run_alone(sft_file, model):
    """Tolerance 1e-5: the same fp32 weights and tokens; a document alone and inside a packed row go
    through kernels of different shapes (a shorter sequence, a block-diagonal mask), which sum in
    another order (seen: under 1e-6). Were documents to see each other, or positions not restart, the
    logits would move by more than 1 (seen: about 2; checked below that the test can tell)."""
    path, cache = sft_file
    cfg = compose([*sft_data(path, "prompt_completion", cache), f"model={model}", "train.seq_len=48",
                   "train.micro_batch_size=4"])
    ensure_prepared(cfg)
    loader = BatchLoader(open_samples(cfg, training_sources(cfg), "train"), [1.0], BatchPlan(4, 1, 1, 0), cfg.seed)
    batch = loader.micro_batch(0, 0)
    net = build_model(cfg.model, cfg.seed, special_tokens=special_token_ids(cfg.data.tokenizer)).eval()
    worst = 0.0
    with torch.no_grad():
        packed = net(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        unaware = net(input_ids=batch["input_ids"], use_cache=False).logits
        for row in range(batch["input_ids"].shape[0]):
            positions = batch["position_ids"][row].tolist()
            starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
            documents = 0
            for start, end in itertools.pairwise(starts):  # each document, and the padding after the last
                assert positions[start:end] == list(range(end - start))
                alone = net(input_ids=batch["input_ids"][row:row + 1, start:end], use_cache=False).logits[0]
                torch.testing.assert_close(packed[row, start:end], alone, rtol=0, atol=1e-5)
                worst = max(worst, float((packed[row, start:end] - alone).abs().max()))
                if start > 0:  # a document's first token is not predicted from the one before it
                    assert batch["labels"][row, start] == IGNORE
                documents += int((batch["labels"][row, start:end] != IGNORE).any())
            assert documents >= 2, f"row {row} holds {documents} document(s); the test needs packed rows"
    print(f"worst |packed - alone| {worst:.1e}, without restarting positions {(packed - unaware).abs().max():.1f}")
    assert (packed - unaware).abs().max() > 1.0


# --------------------------------------------------- 3. the loss is averaged over the global batch's tokens

# wsd here also puts the engine's learning rate through test 6's formula, step by step.
AVERAGE_STEPS = 6
SCHEDULE = {"warmup": 2, "fraction": 0.5, "min_ratio": 0.1, "shape": "cosine"}


def average_overrides(path: Path, cache: Path, run_dir: Path) -> list[str]:
    return [*sft_data(path, "prompt_completion", cache), "train.seq_len=48", "train.micro_batch_size=2",
            "train.grad_accum=2", f"train.max_steps={AVERAGE_STEPS}", "logging.interval=1", "eval.interval=0",
            "checkpoint.save_final=false", "scheduler=wsd", f"scheduler.warmup_steps={SCHEDULE['warmup']}",
            f"scheduler.decay_fraction={SCHEDULE['fraction']}", f"scheduler.min_lr_ratio={SCHEDULE['min_ratio']}",
            f"scheduler.decay_shape={SCHEDULE['shape']}", f"run_dir={run_dir}"]


def test_two_ranks_with_accumulation_match_a_reference_averaging_over_every_token(rank_pool, sft_file, tmp_path):
    """2 ranks x 2 micro-batches of 2 packed samples per step, against one process that sums the token
    losses of the whole global batch and divides by its count of trained-on tokens.

    Tolerance 1e-5 on the loss (about 8) and 1e-5 relative on the gradient norm: the same fp32 sums,
    taken in another order (per micro-batch, per rank, then DeepSpeed's all-reduce and its bucketed
    gradient reduction); over 6 Adam steps these stay below 1e-6 (seen: 4.8e-7 on the loss, 4.4e-8 on
    the norm). Averaging per micro-batch instead of per token moves the first step's loss by 7e-3
    here (the token counts are uneven, as checked below), and a gradient scaled wrongly by the
    number of ranks or micro-batches moves the norm by a factor of 2."""
    path, cache = sft_file
    overrides = average_overrides(path, cache, tmp_path / "run")
    cfg = compose(overrides)
    metrics = rank_pool.run(pool_train, overrides)[0]["metrics"]

    # The counts really are uneven: per (rank, micro-batch) of every step, and so per-micro-batch means differ
    # from the token mean.
    ensure_prepared(cfg)
    samples = open_samples(cfg, training_sources(cfg), "train")
    loaders = [BatchLoader(samples, [1.0], BatchPlan(2, 2, 2, rank), cfg.seed) for rank in range(2)]
    for step in range(AVERAGE_STEPS):
        counts = [label_positions(loaders[r].micro_batch(step, m)["labels"]) for r in range(2) for m in range(2)]
        assert len(set(counts)) > 1, f"step {step + 1}: every micro-batch trains on {counts[0]} tokens"
        assert sum(counts) == loaders[0].step_label_count(step)

    expected_loss, expected_norm = reference_steps(cfg, dp_size=2, steps=AVERAGE_STEPS, multiplier=schedule_of(cfg))
    assert [m["step"] for m in metrics] == list(range(1, AVERAGE_STEPS + 1))
    got, norms = [m["loss"] for m in metrics], [m["grad_norm"] for m in metrics]
    worst_loss = max(abs(a - b) for a, b in zip(got, expected_loss))
    worst_norm = max(abs(a / b - 1) for a, b in zip(norms, expected_norm))
    print(f"worst |loss - reference| {worst_loss:.1e}, worst relative gradient-norm difference {worst_norm:.1e}")
    assert worst_loss <= 1e-5, (got, expected_loss)
    assert worst_norm <= 1e-5, (norms, expected_norm)
    assert got[-1] < got[0]  # it trained
    # The engine's learning rate at each step is the schedule's.
    lr = cfg.optimizer.lr
    assert [m["lr"] for m in metrics] == pytest.approx([lr * schedule_of(cfg)(s) for s in range(AVERAGE_STEPS)],
                                                       rel=1e-12, abs=0)


def schedule_of(cfg):
    return lambda step: wsd_multiplier(step, cfg.scheduler.warmup_steps, cfg.train.max_steps,
                                       cfg.scheduler.min_lr_ratio, cfg.scheduler.decay_fraction,
                                       cfg.scheduler.decay_shape)


# ------------------------------------------------------------------------------------- 4. LoRA

LORA_STEPS, LORA_STOP = 4, 2


def write_chat(path: Path, records: int, seed: int) -> Path:
    rng = random.Random(seed)
    words = "what is a word for the sea sky sun and rain that falls on every town".split()
    with path.open("w") as f:
        for _ in range(records):
            messages = []
            for _ in range(rng.randint(1, 2)):
                messages.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(2, 6))) + "?"})
                messages.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 8)))})
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    """A pretrained model folder (the tiny Llama, freshly initialised, with the bundled tokenizer) and a
    chat file to fine-tune it on."""
    folder = tmp_path_factory.mktemp("lora")
    cfg = compose([])
    base = folder / "base"
    build_model(cfg.model, cfg.seed, special_tokens=special_token_ids(cfg.data.tokenizer)).save_pretrained(base)
    load_tokenizer(cfg.data.tokenizer).save_pretrained(base)
    return base, write_chat(folder / "chat.jsonl", 80, seed=3), folder / "cache"


def lora_overrides(setup, stage: int, run_dir: Path, steps: int) -> list[str]:
    base, chat, cache = setup
    return [f"model.pretrained={base}", "model.lora.r=4", "model.lora.alpha=8", *sft_data(chat, "chat", cache),
            f"zero=stage{stage}", "train.seq_len=48", "train.micro_batch_size=2", f"train.max_steps={steps}",
            "logging.interval=1", "eval.interval=0", "scheduler=constant", "scheduler.warmup_steps=0",
            "optimizer.lr=1e-2", f"run_dir={run_dir}"]


def train_and_inspect(overrides: list[str], zero_loss: bool = False) -> dict | None:
    """On every rank of the pool: train `overrides` as bigtrain.train would, then, before the engine is
    torn down, read its whole parameters (gathered under ZeRO-3) and its logits on a fixed batch.
    Rank 0 returns them with the run's metrics. `zero_loss`: every micro-batch's loss is multiplied by
    0 (at the Trainer.forward seam), so every gradient is exactly zero."""
    import deepspeed
    import torch.distributed as dist

    from bigtrain.config.validate import validate
    from bigtrain.runtime.run import Run
    from bigtrain.runtime.trainer import Trainer

    cfg = compose(overrides)
    validate(cfg, dist.get_world_size())
    session = Run(cfg)
    forward = Trainer.forward
    if zero_loss:
        Trainer.forward = lambda self, step, batch, tokens: forward(self, step, batch, tokens) * 0.0
    try:
        result = session.train()
        engine = session.engine
        assert result.exit_code == 0
        module = engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            params = {name: p.detach().clone() for name, p in module.named_parameters()}
            trainable = sorted(name for name, p in module.named_parameters() if p.requires_grad)
        engine.eval()
        with torch.no_grad():
            logits = engine(input_ids=fixed_batch(4096), use_cache=False).logits.detach().clone()
    finally:
        Trainer.forward = forward
        session.close()
    if dist.get_rank() != 0:
        return None
    return {"metrics": read_metrics(Path(result.run_dir)), "params": params, "trainable": trainable,
            "logits": logits}


def base_name(peft_name: str) -> str:
    """The pretrained model's name for a frozen parameter of the peft-wrapped model."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".")


@pytest.mark.parametrize("stage", [2, 3])
def test_lora_trains_only_the_adapters_resumes_bitwise_and_exports(rank_pool, lora_setup, tmp_path, stage):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from bigtrain.cli import main as bigtrain_cli

    base = lora_setup[0]
    run_dir = tmp_path / "full"
    full = rank_pool.run(train_and_inspect, lora_overrides(lora_setup, stage, run_dir, LORA_STEPS))[0]

    # Only the adapters trained: every other weight is bitwise the pretrained one.
    pretrained = load_file(base / "model.safetensors")
    adapters = [name for name in full["params"] if "lora_" in name]
    assert full["trainable"] == sorted(adapters) and len(adapters) == 2 * 7 * 4  # A and B, 7 linears x 4 layers
    frozen = {base_name(n): p for n, p in full["params"].items() if "lora_" not in n}
    assert frozen.keys() == pretrained.keys()
    for name, weight in frozen.items():
        assert torch.equal(weight, pretrained[name]), f"{name} changed"
    for name in adapters:  # peft starts every B at zero (the adapted model starts as the base): all trained
        assert "lora_B" not in name or full["params"][name].abs().max() > 0, f"{name} did not train"
    losses = [m["loss"] for m in full["metrics"]]
    assert losses[-1] < losses[0]

    # The checkpoint holds the adapters and their optimizer state (about 2% of the base here), not the base.
    checkpoint = run_dir / "checkpoints" / f"step_{LORA_STEPS:08d}"
    size = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
    print(f"checkpoint {size} bytes, base {(base / 'model.safetensors').stat().st_size} bytes")
    assert size < (base / "model.safetensors").stat().st_size / 10

    # Bitwise resume: stop at LORA_STOP (checkpoint), resume to LORA_STEPS in the same run dir. fp32 on the
    # CPU, same ranks, same data and restored state: the losses are equal exactly, no tolerance.
    resumed_dir = tmp_path / "resumed"
    rank_pool.run(pool_train, lora_overrides(lora_setup, stage, resumed_dir, LORA_STOP))
    second = rank_pool.run(pool_train, lora_overrides(lora_setup, stage, resumed_dir, LORA_STEPS))[0]
    assert "resumed from" in (resumed_dir / "train.log").read_text()
    assert [m["step"] for m in second["metrics"]] == list(range(1, LORA_STEPS + 1))
    assert [m["loss"] for m in second["metrics"]] == losses

    # Exports. Tolerance 1e-5 on logits up to about 2: the same fp32 weights, merged (W + BA summed once
    # into W) or kept apart, so the matmuls sum in another order (seen: at most 1.4e-6 merged; the
    # adapter loaded by peft computes as the engine did, bitwise here).
    merged = tmp_path / "merged"
    assert bigtrain_cli(["export", str(run_dir), str(merged)]) == 0
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert not any("lora" in name for name, _ in model.named_parameters())
    with torch.no_grad():
        merged_logits = model(input_ids=fixed_batch(4096)).logits
    print(f"merged export: worst |logit difference| {(merged_logits - full['logits']).abs().max():.1e}, "
          f"largest |logit| {full['logits'].abs().max():.1f}")
    torch.testing.assert_close(merged_logits, full["logits"], rtol=0, atol=1e-5)

    adapter = tmp_path / "adapter"
    assert bigtrain_cli(["export", str(run_dir), str(adapter), "--adapter"]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        adapter_logits = peft_model(input_ids=fixed_batch(4096)).logits
    print(f"adapter export: worst |logit difference| {(adapter_logits - full['logits']).abs().max():.1e}")
    torch.testing.assert_close(adapter_logits, full["logits"], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ 5. no-decay groups

# With every gradient zero, Adam's own update is exactly zero, so an AdamW step moves a parameter only
# by its weight decay, w <- w * (1 - lr * wd): a matrix shrinks by 1e-3 here, an exempt one stays.
LR, WD = 1e-2, 0.1


@pytest.mark.parametrize("model,exempt,decayed", [
    ("tiny_llama", ["model.norm.weight", "model.layers.0.input_layernorm.weight", "model.embed_tokens.weight"],
     ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight", "lm_head.weight"]),
    ("tiny_gpt2", ["transformer.ln_f.weight", "transformer.h.0.ln_1.bias", "transformer.h.0.attn.c_attn.bias",
                   "transformer.wte.weight", "transformer.wpe.weight"],
     ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_proj.weight"]),
])
def test_norms_biases_and_embeddings_do_not_decay_and_matrices_do(model, exempt, decayed):
    """A real torch AdamW step over the groups bigtrain builds (the default optimizer.no_decay).
    Tolerance 1e-6 relative on a decayed weight: one fp32 multiplication (half an ulp, 6e-8)."""
    cfg = compose([f"model={model}"])
    net = build_model(cfg.model, cfg.seed, special_tokens=special_token_ids(cfg.data.tokenizer))
    optimizer = torch.optim.AdamW(parameter_groups(net, WD, cfg.optimizer.no_decay), lr=LR)
    params = dict(net.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name in exempt:
        assert torch.equal(params[name], before[name]), f"{name} decayed"
    for name in decayed:
        torch.testing.assert_close(params[name], before[name] * (1 - LR * WD), rtol=1e-6, atol=0)
    # Every parameter is in one group or the other.
    grouped = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(grouped) == len(params) and {id(p) for p in grouped} == {id(p) for p in params.values()}


def test_the_engine_at_zero2_decays_matrices_only(rank_pool, sft_file, tmp_path):
    """The same through a 2-rank ZeRO-2 run (each rank steps its half of the flat groups): one step whose
    loss is multiplied by 0. Every norm weight and the embedding are bitwise the initial ones, every
    other weight is the initial one times (1 - lr * wd), within 1e-6 (one fp32 multiplication)."""
    path, cache = sft_file
    overrides = [*sft_data(path, "prompt_completion", cache), "zero=stage2", "train.seq_len=48",
                 "train.micro_batch_size=2", "train.max_steps=1", "eval.interval=0", "checkpoint.save_final=false",
                 "scheduler=constant", "scheduler.warmup_steps=0", f"optimizer.lr={LR}",
                 f"optimizer.weight_decay={WD}", f"run_dir={tmp_path / 'run'}"]
    after = rank_pool.run(train_and_inspect, overrides, True)[0]["params"]
    cfg = compose(overrides)
    initial = dict(build_model(cfg.model, cfg.seed, special_tokens=special_token_ids(cfg.data.tokenizer))
                   .named_parameters())
    assert after.keys() == initial.keys()
    exempt = [name for name in after if "norm" in name or "embed_tokens" in name]
    assert len(exempt) == 1 + 2 * 4 + 1  # the embedding, two norms per layer, the final norm
    for name, weight in after.items():
        if name in exempt:
            assert torch.equal(weight, initial[name]), f"{name} decayed"
        else:
            torch.testing.assert_close(weight, initial[name].detach() * (1 - LR * WD), rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------ 6. WSD


@pytest.mark.parametrize("steps,warmup,fraction,min_ratio,shape", [
    (20, 4, 0.25, 0.0, "linear"),
    (20, 4, 0.25, 0.1, "cosine"),
    (30, 0, 0.5, 0.2, "linear"),
    (12, 3, 1.0, 0.0, "cosine"),  # the decay takes every step after the warm-up
])
def test_wsd_learning_rate_equals_its_formula_at_every_step(steps, warmup, fraction, min_ratio, shape):
    cfg = compose(["scheduler=wsd", f"train.max_steps={steps}", f"scheduler.warmup_steps={warmup}",
                   f"scheduler.decay_fraction={fraction}", f"scheduler.min_lr_ratio={min_ratio}",
                   f"scheduler.decay_shape={shape}", "optimizer.lr=0.003"])
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([weight], lr=cfg.optimizer.lr)
    scheduler = build_scheduler(optimizer, cfg)
    curve = []
    for _ in range(steps):
        curve.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.003 * wsd_multiplier(s, warmup, steps, min_ratio, fraction, shape) for s in range(steps)]
    assert curve == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # Its shape: the peak is reached and held, then the last step is at min_lr_ratio.
    assert max(curve) == pytest.approx(0.003) and curve[-1] == pytest.approx(0.003 * min_ratio, abs=1e-15)


# ------------------------------------------------------------- 7. bad chat data is refused before launch

BAD_CHATS = {
    "unknown_role": ({"messages": [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "yo"}]},
                     "message 0 has role 'human'; the roles are system, user, assistant"),
    "no_content": ({"messages": [{"role": "user", "text": "hi"}, {"role": "assistant", "content": "yo"}]},
                   "message 0 of 'messages' needs a 'role' and a 'content' (it has ['role', 'text'])"),
    "no_assistant": ({"messages": [{"role": "user", "content": "hi"}]}, "has no assistant message"),
    "no_messages_field": ({"conversation": [{"role": "user", "content": "hi"}]},
                          "has no field 'messages' (data.messages_field)"),
}
GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def check_refused(stderr: str, prefix: str, words: str) -> None:
    assert stderr.startswith(prefix) and words in stderr, stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr  # one paragraph


@pytest.mark.parametrize("case", BAD_CHATS)
def test_a_chat_file_with_bad_messages_exits_2_before_any_rank_starts(tmp_path, case, capsys):
    """bigtrain.train's own entry point (run here in this process: it returns the exit code) stops at
    validation; no process group, run dir or prepared data."""
    import torch.distributed as dist

    from bigtrain.train import main

    record, words = BAD_CHATS[case]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(record) + "\n")
    assert main([*sft_data(path, "chat", tmp_path / "cache"), f"run_dir={tmp_path / 'run'}"]) == 2
    check_refused(capsys.readouterr().err, "bigtrain: config error: The first record of", words)
    assert not dist.is_initialized()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl"]  # no run dir, no prepared data


@pytest.mark.commands
def test_a_launched_run_on_a_bad_chat_file_exits_2_and_writes_nothing(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(BAD_CHATS["unknown_role"][0]) + "\n")
    proc = subprocess.run([sys.executable, "-m", "bigtrain.train", *sft_data(path, "chat", tmp_path / "cache"),
                           f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 2, proc.stderr
    check_refused(proc.stderr, "bigtrain: config error:", BAD_CHATS["unknown_role"][1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl"]


@pytest.mark.parametrize("case", ["unknown_role", "no_content"])
def test_a_bad_record_after_the_first_is_refused_by_prepare(tmp_path, case, capsys):
    """Validation reads the first record; `bigtrain prepare` (run before launching, or by the ranks when
    the data is not prepared yet) checks every record, and refuses the file rather than train on a
    conversation it would render wrongly, writing nothing."""
    from bigtrain.cli import main

    record, words = BAD_CHATS[case]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [GOOD_CHAT, GOOD_CHAT, record, GOOD_CHAT]))
    out = tmp_path / "out"
    assert main(["prepare", "--no-progress", "--workers", "1", "--out", str(out),
                 *sft_data(path, "chat", tmp_path / "cache")]) == 2
    check_refused(capsys.readouterr().err, f"bigtrain: prepare error: Record 3 of '{path}':", words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl"]
