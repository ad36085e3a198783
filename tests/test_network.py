"""The network: shapes of every variant, gradients, the paper's modules checked one by one."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from egcmf_model.config import VARIANTS, load_config
from egcmf_model.fusion import AxialCrossAttention
from egcmf_model.he_branch import MRFM
from egcmf_model.network import EGCMF, needs_ck56
from egcmf_model.saliency import centre_box, grad_cam, window_search

TINY = load_config("tiny").model


def _model(variant: str, **changes) -> EGCMF:
    torch.manual_seed(0)
    return EGCMF(dataclasses.replace(TINY, variant=variant, **changes), 3, [1, 2])


def _inputs(b: int, h: int, w: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {"he": r(b, 3, h, w), "he_40x": r(b, 3, 4 * h, 4 * w), "ck56": r(b, 3, h, w),
            "edge": r(b, 2, h, w)}


class VariantContract:
    """One shared base class that every variant's test subclasses (smp-style)."""

    variant = "full"

    @pytest.mark.parametrize(("h", "w"), [(64, 64), (96, 96), (64, 96)])
    def test_output_shapes(self, h: int, w: int) -> None:
        out = _model(self.variant)(**_inputs(2, h, w))
        assert out["logits"].shape == (2, 3, h, w)
        assert out["cam"].shape == (2, h, w)
        if self.variant != "unet":
            side = TINY.in_size  # the 40x crop of an H/4 box: the configured size, any input
            assert out["logits_high"].shape == (2, 3, side, side)
            assert out["boxes"].shape == (2, 4)
            assert ((out["boxes"][:, 2:] - out["boxes"][:, :2]) == 16).all()
        if needs_ck56(self.variant):
            assert out["logits_aim"].shape == (2, 3, h, w)
            assert out["sem"].shape == (2, 3, h, w)
            assert out["edge"].shape == (2, 1, h, w)

    def test_bad_sizes_say_how_to_fix(self) -> None:
        with pytest.raises(ValueError, match="multiples of 32; pad to 96x64"):
            _model(self.variant)(**_inputs(1, 70, 64))


class TestUnet(VariantContract):
    variant = "unet"


class TestMrcfm(VariantContract):
    variant = "mrcfm"


class TestMrfm(VariantContract):
    variant = "mrfm"


class TestMrfmEdm(VariantContract):
    variant = "mrfm+edm"


class TestFull(VariantContract):
    variant = "full"


def test_variants_are_table_v() -> None:
    assert VARIANTS == ("unet", "mrcfm", "mrfm", "mrfm+edm", "full")


def test_every_parameter_of_full_gets_a_gradient() -> None:
    from egcmf_model.losses import EGCMFLoss

    model = _model("full")
    inputs = _inputs(2, 64, 64)
    batch = {"mask": torch.randint(0, 3, (2, 64, 64)),
             "mask_40x": torch.randint(0, 3, (2, 256, 256)),
             "edge_target": torch.randint(0, 2, (2, 64, 64)).float()}
    loss, _ = EGCMFLoss(0.5)(model(**inputs), batch)
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert dead == []


def test_h_and_e_only_variant_rejects_missing_ck56_clearly() -> None:
    inputs = _inputs(1, 64, 64)
    del inputs["ck56"], inputs["edge"]
    assert _model("mrfm")(**inputs)["logits"].shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="--variant mrfm"):
        _model("full")(**inputs)


def test_window_search_picks_the_hottest_box() -> None:
    saliency = torch.zeros(2, 64, 64)
    saliency[0, 40:56, 8:24] = 1.0  # exactly one 16 px window on the stride-4 grid
    saliency[1, 10:20, 30:40] = 1.0
    boxes = window_search(saliency, window=16, stride=4)
    assert boxes[0].tolist() == [40, 8, 56, 24]
    y0, x0, y1, x1 = boxes[1].tolist()
    assert y0 <= 10
    assert y1 >= 20
    assert x0 <= 30
    assert x1 >= 40
    assert centre_box(1, (64, 64), 16, torch.device("cpu"))[0].tolist() == [24, 24, 40, 40]


def test_mrfm_writes_detail_features_exactly_into_the_box() -> None:
    torch.manual_seed(0)
    mrfm = MRFM(c_detail=8, c_target=6, reduction=2, norm="batch").eval()
    target = torch.randn(2, 6, 32, 32)
    detail = torch.randn(2, 8, 8, 8)
    boxes = torch.tensor([[4, 8, 12, 16], [20, 0, 28, 8]])
    out = mrfm(target, detail, boxes)
    for b, (y0, x0, y1, x1) in enumerate(boxes.tolist()):
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        assert torch.equal(out[b][:, ~inside], target[b][:, ~inside])
        expected = mrfm.smooth(target[b:b + 1, :, y0:y1, x0:x1]
                               + mrfm.project(mrfm.se(detail[b:b + 1])))
        assert torch.allclose(out[b, :, y0:y1, x0:x1], expected[0], atol=1e-6)
    with pytest.raises(AssertionError, match=r"eq\. 1-2"):
        mrfm(target, torch.randn(2, 8, 4, 4), boxes)


def _naive_axial(module: AxialCrossAttention, q_src: torch.Tensor, kv: torch.Tensor
                 ) -> torch.Tensor:
    b, c, h, w = q_src.shape
    nh, d = module.heads, c // module.heads
    out = torch.zeros_like(q_src)
    for projections, rows in ((module.qkv_hor, True), (module.qkv_ver, False)):
        q, k, v = (p(x) for p, x in zip(projections, (q_src, kv, kv), strict=True))
        for n in range(b):
            for head in range(nh):
                ch = slice(head * d, (head + 1) * d)
                for i in range(h if rows else w):
                    qi = q[n, ch, i, :] if rows else q[n, ch, :, i]  # (d, L)
                    ki = k[n, ch, i, :] if rows else k[n, ch, :, i]
                    vi = v[n, ch, i, :] if rows else v[n, ch, :, i]
                    attn = torch.softmax(qi.T @ ki / d**0.5, dim=-1)  # (L, L)
                    res = (attn @ vi.T).T  # (d, L)
                    if rows:
                        out[n, ch, i, :] += res
                    else:
                        out[n, ch, :, i] += res
    return out


def test_axial_cross_attention_equals_naive_reference() -> None:
    torch.manual_seed(0)
    module = AxialCrossAttention(channels=32, heads=2)
    assert module.heads == 2  # two heads of 16 channels
    q, kv = torch.randn(2, 32, 5, 7), torch.randn(2, 32, 5, 7)
    assert torch.allclose(module(q, kv), _naive_axial(module, q, kv), atol=1e-5)


def test_axial_cross_attention_takes_sdpa_fused_path() -> None:
    """SDPA on 5-D tensors falls back to its math kernel, which materialises every attention
    matrix; MSFFM folds rows into the batch so that the fused kernel runs, forward and backward."""
    from torch.profiler import profile

    module = AxialCrossAttention(channels=32, heads=2)
    q = torch.randn(2, 32, 6, 8, requires_grad=True)
    kv = torch.randn(2, 32, 6, 8)
    with profile() as prof:
        module(q, kv).sum().backward()
    kernels = {e.key for e in prof.key_averages()}
    assert "aten::scaled_dot_product_attention" in kernels
    assert "aten::_scaled_dot_product_attention_math" not in kernels, sorted(kernels)
    assert torch.allclose(module(q, kv), _naive_axial(module, q, kv), atol=1e-5)


def test_grad_cam_leaves_parameter_gradients_unchanged() -> None:
    model = _model("mrfm")
    inputs = _inputs(2, 64, 64)
    out = model(**inputs)
    out["logits"].square().mean().backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    head = model.he_branch.target.head
    feats = torch.randn(2, head.in_channels, 64, 64, requires_grad=True)
    cam = grad_cam(feats, head, [1, 2])
    assert cam.shape == (2, 64, 64)
    assert cam.min() >= 0
    assert cam.max() <= 1
    assert feats.grad is None
    after = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_grad_cam_inside_forward_does_not_change_training_gradients() -> None:
    """The gradient of a loss must be what it would be with the saliency computed elsewhere."""
    model = _model("unet").eval()  # eval: BatchNorm statistics fixed, so passes are comparable
    inputs = _inputs(2, 64, 64)
    model(**inputs)["logits"].sum().backward()
    with_cam = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    stages = model.he_branch.target.encoder(inputs["he"])
    levels = model.he_branch.target.decoder(stages)
    model.he_branch.target.head(levels[-1]).sum().backward()
    assert all(torch.allclose(a, p.grad) for a, p in zip(with_cam, model.parameters(), strict=True))


def test_saliency_follows_the_tumour_logits() -> None:
    head = torch.nn.Conv2d(4, 3, 1)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.weight[1, 0] = 1.0  # class 1 reads channel 0
    feats = torch.zeros(1, 4, 32, 32)
    feats[0, 0, 4:12, 20:28] = 1.0
    cam = grad_cam(feats, head, [1])
    assert cam[0, 4:12, 20:28].min() == 1.0
    assert cam[0].sum() == 64
    assert window_search(cam, 8, 4)[0].tolist() == [4, 20, 12, 28]


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
def test_grad_cam_under_opacus_keeps_per_sample_gradients_exact() -> None:
    """Under DP-SGD the CAM must add nothing to the per-sample gradients (SPEC pitfalls)."""
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    model = _model("mrfm", norm="group")
    assert ModuleValidator.validate(model, strict=False) == []
    wrapped = GradSampleModule(model, loss_reduction="sum")
    inputs = _inputs(3, 64, 64)
    wrapped(**inputs)["logits"].square().sum().backward()
    params = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    scale = max(float(p.grad.abs().max()) for _, p in params)  # float32 noise is relative to it
    for name, p in params:
        assert p.grad_sample.shape[0] == 3, name
        assert torch.allclose(p.grad_sample.sum(0), p.grad, rtol=1e-4, atol=1e-6 * scale), name
