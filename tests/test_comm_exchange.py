"""bigtrain's compressed gradient exchanges on their own: bit packing, the error-feedback identity,
PowerSGD's compression plan, and a 2-rank run on a fixed sequence of gradients showing that with
error feedback the applied gradients add up to the true ones (and without it they do not)."""

import math

import torch
from comm_exchange_probe import exchange_report

from bigtrain.comm.onebit import BLOCK, SignCompressor, decompress, pack_signs, unpack_signs
from bigtrain.comm.powersgd import compressed_numel, plan_compression
from bigtrain.comm.wire import bytes_sent


def test_sign_packing_round_trip():
    values = torch.randn(1024)
    packed = pack_signs(values)
    assert packed.dtype == torch.uint8 and packed.numel() == 1024 // 8
    assert torch.equal(unpack_signs(packed), torch.where(values >= 0, 1.0, -1.0))
    scales = torch.rand(1024 // BLOCK)
    expected = torch.where(values >= 0, 1.0, -1.0).view(-1, BLOCK) * scales.unsqueeze(1)
    assert torch.equal(decompress(packed, scales), expected.view(-1))


def test_error_feedback_carries_exactly_what_compression_dropped():
    """Sum of what was sent + the error still held = sum of the inputs, at every step."""
    torch.manual_seed(0)
    compressor = SignCompressor(4 * BLOCK, error_feedback=True, device="cpu")
    sent_sum, true_sum = torch.zeros(4 * BLOCK), torch.zeros(4 * BLOCK)
    for _ in range(50):
        g = torch.randn(4 * BLOCK) * torch.linspace(0.01, 3, 4 * BLOCK)  # uneven magnitudes
        sent_sum += decompress(*compressor.compress(g))
        true_sum += g
        torch.testing.assert_close(sent_sum + compressor.error, true_sum, rtol=1e-5, atol=1e-4)


def test_powersgd_compresses_only_matrices_worth_it():
    shapes = [torch.Size([4096, 256]), torch.Size([256]), torch.Size([8, 8]), torch.Size([256, 688])]
    plan = plan_compression(shapes, low_rank=4)
    # 4 (n + m) < n m / 2 decides, as in torch's hook: the 8 x 8 matrix is sent as it is.
    assert plan == [(4096, 256, 4), None, None, (256, 688, 4)]
    assert compressed_numel(shapes, 4) == (4096 + 256) * 4 + 256 + 64 + (256 + 688) * 4


def test_bytes_on_the_wire_per_collective():
    assert bytes_sent("all_reduce", 100, 2) == 100 and bytes_sent("all_reduce", 100, 4) == 150
    assert bytes_sent("all_gather_into_tensor", 100, 4) == 300  # this rank's shard to 3 peers
    assert bytes_sent("all_to_all_single", 100, 4) == 75
    assert bytes_sent("all_reduce", 100, 1) == 0


def test_error_feedback_makes_applied_gradients_track_true_ones(rank_pool):
    report = rank_pool.run(exchange_report, [100, 400])[0]
    results = report["results"]
    for method in ("onebit", "powersgd"):
        with_ef, without = results[f"{method}-ef"], results[f"{method}-no_ef"]
        assert with_ef["ranks_agree"] and without["ranks_agree"]
        # With error feedback the gap between the sums stays bounded while the sums grow, so the
        # relative gap shrinks (measured: onebit 9.3% -> 4.6%, powersgd 20% -> 5.2%).
        rel = with_ef["relative_error"]
        assert rel["400"] < 0.1 and rel["400"] < 0.6 * rel["100"], with_ef
        # Without it, the same fraction of every step is lost for good (measured 58% and 95%).
        rel = without["relative_error"]
        assert rel["400"] > 0.4 and rel["400"] > 0.9 * rel["100"], without

    # Bytes one exchange sent, as DeepSpeed's comms logger saw them, against the formulas.
    numel, world = report["numel"], report["world_size"]
    chunk = math.ceil(numel / (world * BLOCK)) * BLOCK  # each rank's share, whole blocks
    signs_and_scales = chunk * world // 8 + chunk * world // BLOCK * 4
    onebit = signs_and_scales * (world - 1) / world + signs_and_scales // world * (world - 1)
    assert results["onebit-ef"]["bytes_per_step"] == onebit
    powersgd = ((96 + 64) * 2 + 64 + (64 + 200) * 2) * 4 * 2 * (world - 1) / world
    assert results["powersgd-ef"]["bytes_per_step"] == powersgd
