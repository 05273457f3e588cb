"""bf16 mixed precision trains and stays close to the fp32 reference.

On a CPU without bf16 units the matmuls are emulated, so this is kept to a few short steps.
Tolerance: 2% of the loss. bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2%); a forward
pass accumulates such roundings over a few layers into logits errors of ~0.5%, and three steps of
updates computed from bf16 gradients add about as much again (measured on a 2-core CPU: at most
3e-4). A broken bf16 path (no fp32 master
weights, wrong casts, a loss scaled twice) is off by far more or does not learn at all.
"""

from conftest import FAST, pool_train, read_metrics
from reference import reference_losses

from bigtrain.config import compose

STEPS = 4
OVERRIDES = [*FAST, f"train.max_steps={STEPS}", "zero=stage2"]


def test_bf16_follows_fp32_reference(rank_pool1, tmp_path):
    run_dir = tmp_path / "run"
    rank_pool1.run(pool_train, [*OVERRIDES, "precision=bf16", f"run_dir={run_dir}"])
    got = [m["loss"] for m in read_metrics(run_dir)]
    expected = reference_losses(compose(OVERRIDES), dp_size=1, steps=STEPS)
    relative = [abs(a - b) / b for a, b in zip(got, expected)]
    print(f"bf16 vs fp32 relative loss error per step: {[f'{r:.1e}' for r in relative]}")
    assert max(relative) < 0.02, (got, expected)
    assert got[-1] < got[0]
    assert relative[0] > 0, "bf16 compute should round differently from fp32"
