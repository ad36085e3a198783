from __future__ import annotations

import math

import pytest
import torch

from egcmf_model.losses import EGCMFLoss, binary_dice_loss, cross_entropy, dice_loss
from egcmf_model.metrics import SegmentationMetrics


def test_dice_loss_by_hand() -> None:
    # One image of 2 pixels, 2 classes; softmax of these logits is exactly (0.5, 0.5) and (1, 0).
    logits = torch.tensor([[[[0.0, 100.0]], [[0.0, 0.0]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[1, 0]]])
    # class 0: inter 0.5*0 + 1*1 = 1, sums 1.5 + 1 -> (2+1)/(2.5+1); class 1: inter .5, 0.5+1
    expected = 1 - ((2 * 1 + 1) / (2.5 + 1) + (2 * 0.5 + 1) / (1.5 + 1)) / 2
    assert dice_loss(logits, target).item() == pytest.approx(expected, abs=1e-6)


def test_ignore_index_is_excluded_everywhere() -> None:
    logits = torch.randn(1, 3, 4, 4)
    target = torch.randint(0, 3, (1, 4, 4))
    ignored = target.clone()
    ignored[0, 0] = 255
    changed = logits.clone()
    changed[0, :, 0] = torch.randn(3, 4) * 50  # wild logits where the label is ignored
    assert dice_loss(logits, ignored) == pytest.approx(dice_loss(changed, ignored).item())
    assert cross_entropy(logits, ignored) == pytest.approx(cross_entropy(changed, ignored).item())
    assert cross_entropy(logits, torch.full((1, 4, 4), 255)).item() == 0.0


def test_binary_dice_by_hand() -> None:
    logits = torch.tensor([[[[100.0, -100.0, 100.0]]]])  # sigmoid -> 1, 0, 1
    target = torch.tensor([[[1.0, 0.0, 0.0]]])
    valid = torch.tensor([[[1.0, 1.0, 0.0]]])  # third pixel ignored
    assert binary_dice_loss(logits, target, valid).item() == pytest.approx(1 - 3 / 3, abs=1e-6)


def test_total_loss_follows_eq_7_to_9() -> None:
    torch.manual_seed(0)
    out = {"logits": torch.randn(2, 3, 8, 8), "logits_high": torch.randn(2, 3, 8, 8),
           "logits_aim": torch.randn(2, 3, 8, 8), "boxes": torch.tensor([[0, 0, 2, 2]] * 2),
           "sem": torch.randn(2, 3, 8, 8), "edge": torch.randn(2, 1, 8, 8)}
    batch = {"mask": torch.randint(0, 3, (2, 8, 8)), "mask_40x": torch.randint(0, 3, (2, 32, 32)),
             "edge_target": torch.randint(0, 2, (2, 8, 8)).float()}
    total, parts = EGCMFLoss(gamma=0.25)(out, batch)
    p, m = out["logits"], batch["mask"]
    high = cross_entropy(out["logits_high"], batch["mask_40x"][:, :8, :8])
    seg = 0.5 * dice_loss(p, m) + 0.5 * cross_entropy(p, m) + 0.5 * high
    seg = seg + 0.5 * cross_entropy(out["logits_aim"], m)
    edge = 0.5 * cross_entropy(out["sem"], m) + 0.5 * binary_dice_loss(
        out["edge"], batch["edge_target"], torch.ones(2, 8, 8))
    assert total.item() == pytest.approx((seg + 0.25 * edge).item(), rel=1e-6)
    assert parts["loss"] == pytest.approx(total.item())


def test_metrics_by_hand_accumulated_over_batches() -> None:
    classes = ("background", "in_situ", "invasive")
    metrics = SegmentationMetrics(classes)
    # truth / prediction pairs, fed in two batches; 255 is ignored.
    metrics.update(torch.tensor([[0, 1, 1, 2]]), torch.tensor([[0, 1, 2, 2]]))
    metrics.update(torch.tensor([[1, 0, 2, 0]]), torch.tensor([[1, 1, 255, 0]]))
    result = metrics.aggregate()
    # confusion rows = truth: bg: [2, 0, 0]; in_situ: [1, 2, 0]; invasive: [0, 1, 1]
    assert result["confusion"] == [[2, 0, 0], [1, 2, 0], [0, 1, 1]]
    assert result["acc"] == pytest.approx(5 / 7)
    d1, d2 = 2 * 2 / (4 + 1 + 1), 2 * 1 / (2 + 0 + 1)
    i1, i2 = 2 / 4, 1 / 2
    assert result["per_class"]["in_situ"] == {"dice": pytest.approx(d1), "iou": pytest.approx(i1)}
    assert result["dice"] == pytest.approx((d1 + d2) / 2)  # background is not an annotated class
    assert result["miou"] == pytest.approx((i1 + i2) / 2)
    assert result["per_class"]["background"]["dice"] == pytest.approx(4 / 5)
    metrics.reset()
    assert math.isnan(metrics.aggregate()["acc"])


def test_metrics_accept_logits_and_skip_absent_classes() -> None:
    metrics = SegmentationMetrics(("tumor", "stroma", "other"))
    logits = torch.zeros(1, 3, 1, 2)
    logits[0, 0, 0, 0] = logits[0, 1, 0, 1] = 5
    metrics.update(logits, torch.tensor([[[0, 1]]]))
    result = metrics.aggregate()
    assert result["dice"] == 1.0
    assert result["per_class"]["other"]["dice"] is None


def _outputs(batch_size: int, seed: int = 0) -> tuple[dict, dict]:
    """Every output EGCMFLoss reads (the full variant's), with some ignored labels."""
    g = torch.Generator().manual_seed(seed)
    out = {"logits": torch.randn(batch_size, 3, 8, 8, generator=g),
           "logits_high": torch.randn(batch_size, 3, 8, 8, generator=g),
           "logits_aim": torch.randn(batch_size, 3, 8, 8, generator=g),
           "boxes": torch.tensor([[0, 0, 2, 2], [2, 4, 4, 6], [6, 6, 8, 8]][:batch_size]),
           "sem": torch.randn(batch_size, 3, 8, 8, generator=g),
           "edge": torch.randn(batch_size, 1, 8, 8, generator=g)}
    mask = torch.randint(0, 3, (batch_size, 8, 8), generator=g)
    mask[0, :6] = 255  # sample 0 labels 16 pixels, the others 64: the CE normalisers differ
    if batch_size > 1:
        mask[-1] = 255  # the last sample labels nothing at all
    batch = {"mask": mask, "mask_40x": torch.randint(0, 3, (batch_size, 32, 32), generator=g),
             "edge_target": torch.randint(0, 2, (batch_size, 8, 8), generator=g).float()}
    return out, batch


def test_per_sample_loss_is_the_mean_of_each_samples_loss() -> None:
    """What DP-SGD needs: loss(batch) == mean(loss(sample)), CE's normaliser included."""
    out, batch = _outputs(3)
    each = EGCMFLoss(gamma=0.5, per_sample=True)

    def sample(i: int, d: dict) -> dict:
        return {k: v[i : i + 1] for k, v in d.items()}

    alone = [each(sample(i, out), sample(i, batch)) for i in range(3)]
    total, parts = each(out, batch)
    assert total.item() == pytest.approx(sum(t.item() for t, _ in alone) / 3, rel=1e-6)
    for key in parts:
        assert parts[key] == pytest.approx(sum(p[key] for _, p in alone) / 3, rel=1e-6)
    # Pooled over the batch, neither Dice nor CE (through its normaliser) is such a mean.
    pooled = EGCMFLoss(gamma=0.5)
    assert pooled(out, batch)[0].item() != pytest.approx(total.item(), rel=1e-3)
    logits, mask = out["logits"][:2], batch["mask"][:2]
    assert cross_entropy(logits, mask).item() != pytest.approx(
        cross_entropy(logits, mask, per_sample=True).mean().item(), rel=1e-3)
    assert cross_entropy(out["logits"], batch["mask"], per_sample=True)[-1].item() == 0.0


def test_per_sample_terms_equal_the_pooled_ones_for_one_sample() -> None:
    out, batch = _outputs(1)
    assert EGCMFLoss(per_sample=True)(out, batch)[0].item() == pytest.approx(
        EGCMFLoss()(out, batch)[0].item(), rel=1e-6)
