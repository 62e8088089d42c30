"""Bugs that the suite once let through: each test fails on the deliberately broken code."""

import torch

from resnet_lab.ablation.engine import k_subsets
from resnet_lab.ablation.report import lesion_summary
from resnet_lab.data.cifar import random_crop_flip


def test_random_crops_reach_every_offset_from_0_to_2_pad_and_flip_half():
    """Each pixel holds its own column (and the row its row), so the crop offset and the
    flip of every sample can be read back from its output."""
    pad, h, w, b = 4, 8, 8, 4000
    rows = torch.arange(1, h + 1, dtype=torch.float32)[:, None].expand(h, w)
    cols = torch.arange(1, w + 1, dtype=torch.float32)[None, :].expand(h, w)
    x = torch.stack([rows, cols]).expand(b, 2, h, w).contiguous()
    out = random_crop_flip(x, pad=pad, generator=torch.Generator().manual_seed(0))
    # Row offset: output row 0 shows input row dy - pad + 1 (zero padding above the image).
    first_row = out[:, 0, :, :].amax(2)  # (B, H): the image row each output row shows, 0 = padding
    dy = torch.tensor([pad - int((r == 0).sum()) if r[0] == 0 else pad + int(r[0]) - 1 for r in first_row])
    assert sorted(set(dy.tolist())) == list(range(2 * pad + 1))
    # Column offset, read before the flip: a flipped sample shows its columns in descending order.
    c = out[:, 1].amax(1)  # (B, W): the image column each output column shows, 0 = padding
    nz = c.masked_fill(c == 0, float("nan"))
    flipped = torch.tensor([bool(row[~row.isnan()][0] > row[~row.isnan()][-1]) for row in nz])
    c = torch.where(flipped[:, None], c.flip(1), c)
    dx = torch.tensor([pad - int((r == 0).sum()) if r[0] == 0 else pad + int(r[0]) - 1 for r in c])
    assert sorted(set(dx.tolist())) == list(range(2 * pad + 1))
    counts = torch.bincount(dx, minlength=2 * pad + 1).float()
    assert (counts / b - 1 / (2 * pad + 1)).abs().max() < 0.03  # uniform over the 9 offsets
    assert abs(flipped.float().mean().item() - 0.5) < 0.05


def test_k_subsets_are_drawn_afresh_for_each_k():
    blocks = [f"b{i}" for i in range(27)]
    for k in (1, 2, 3, 5):
        subsets = k_subsets(blocks, k, samples=10, seed=0)
        assert len(subsets) == 10 and len(set(subsets)) == 10
        assert all(len(set(s)) == k for s in subsets)
        assert k_subsets(blocks, k, samples=10, seed=0) == subsets  # reproducible from (seed, k)
    # Independent draws: the k=2 subset is rarely inside the k=3 subset of the same seed
    # (probability 3/351 for each); draws that share one stream across k nest every time.
    nested = sum(set(k_subsets(blocks, 2, 1, seed)[0]) <= set(k_subsets(blocks, 3, 1, seed)[0]) for seed in range(40))
    assert nested <= 3
    assert k_subsets(blocks, 2, 10, seed=0) != k_subsets(blocks, 2, 10, seed=1)


def test_kmax_error_is_the_largest_k():
    def row(k, error):
        return {"condition": "eval-bn", "checkpoint": "n", "study": "k", "k": k, "error": error}

    rows = [row(3, 30.0), row(3, 50.0), row(1, 10.0), row(2, 20.0)]  # any order
    summary = lesion_summary(rows)
    assert summary["lesion/kmax_error"] == 40.0
    assert (summary["lesion/k1_error"], summary["lesion/k2_error"], summary["lesion/k3_error"]) == (10.0, 20.0, 40.0)
