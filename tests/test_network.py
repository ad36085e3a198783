"""The network: shapes of every variant, gradients, the paper's modules checked one by one."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from egcmf_model.config import VARIANTS, load_config
from egcmf_model.fusion import AxialCrossAttention
from egcmf_model.he_branch import MRFM
from egcmf_model.network import EGCMF, needs_ck56
from egcmf_model.saliency import centre_box, grad_cam, window_means, window_search

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
            window = min(h, w) // 4  # of the input, whatever the configured in_size
            assert out["boxes"].shape == (2, 4)
            assert ((out["boxes"][:, 2:] - out["boxes"][:, :2]) == window).all()
            assert out["logits_high"].shape == (2, 3, 4 * window, 4 * window)
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


def test_each_variant_has_the_modules_of_table_v() -> None:
    parts = {v: {name for name in ("detail", "mrfm") if hasattr(_model(v).he_branch, name)}
             | {name for name in ("ck56_branch", "fusion", "concat_head")
                if hasattr(_model(v), name)} for v in VARIANTS}
    assert parts == {"unet": set(), "mrcfm": {"detail", "mrfm"}, "mrfm": {"detail", "mrfm"},
                     "mrfm+edm": {"detail", "mrfm", "ck56_branch", "concat_head"},
                     "full": {"detail", "mrfm", "ck56_branch", "fusion"}}
    assert {v: _model(v).he_branch.zoom for v in VARIANTS} == {
        "unet": "none", "mrcfm": "centre", "mrfm": "cam", "mrfm+edm": "cam", "full": "cam"}


def test_mrcfm_zooms_on_the_centre_and_mrfm_where_the_saliency_is() -> None:
    inputs = _inputs(4, 64, 64)
    centre = [24, 24, 40, 40]
    assert _model("mrcfm")(**inputs)["boxes"].tolist() == [centre] * 4
    mrfm = _model("mrfm")
    out = mrfm(**inputs)
    expected = window_search(out["cam"], 16, 4)
    assert torch.equal(out["boxes"], expected)
    assert out["boxes"].tolist() != [centre] * 4


def test_a_flat_saliency_map_falls_back_to_the_centre_window() -> None:
    branch = _model("mrfm").he_branch
    cam = torch.zeros(2, 64, 64)
    cam[1, 0:16, 0:16] = 1.0
    assert branch.key_region(cam).tolist() == [[24, 24, 40, 40], [0, 0, 16, 16]]


def test_window_and_stride_follow_the_input_not_the_configured_size() -> None:
    model = _model("mrfm")  # configured for 64 px
    out = model(**_inputs(1, 128, 128))
    y0, x0, y1, x1 = out["boxes"][0].tolist()
    assert y1 - y0 == x1 - x0 == 32
    assert y0 % 8 == 0  # the stride is 128 / 16
    assert x0 % 8 == 0
    assert out["logits_high"].shape == (1, 3, 128, 128)


def test_the_40x_crop_lines_up_with_the_10x_box() -> None:
    """The detail branch sees at 40x exactly the tissue of the 10x box."""
    model = _model("mrfm").eval()
    he_40x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    he = F.avg_pool2d(he_40x, 4)  # the 10x image is the 40x one averaged, as in the data set
    seen = {}
    model.he_branch.detail.register_forward_pre_hook(lambda _m, args: seen.update(x=args[0]))
    with torch.no_grad():
        boxes = model(he=he, he_40x=he_40x)["boxes"]
    for b, (y0, x0, y1, x1) in enumerate(boxes.tolist()):
        assert seen["x"].shape[-2:] == (4 * (y1 - y0), 4 * (x1 - x0))
        assert torch.allclose(F.avg_pool2d(seen["x"][b : b + 1], 4)[0], he[b, :, y0:y1, x0:x1],
                              atol=1e-6)


def test_batchnorm_statistics_update_once_per_training_step() -> None:
    from egcmf_model.losses import EGCMFLoss

    model = _model("full").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    batch = {"mask": torch.randint(0, 3, (2, 64, 64)),
             "mask_40x": torch.randint(0, 3, (2, 256, 256)),
             "edge_target": torch.randint(0, 2, (2, 64, 64)).float()}
    for _ in range(3):
        optimizer.zero_grad()
        EGCMFLoss(0.5)(model(**_inputs(2, 64, 64)), batch)[0].backward()
        optimizer.step()
    counts = {name: int(m.num_batches_tracked) for name, m in model.named_modules()
              if isinstance(m, torch.nn.BatchNorm2d)}
    assert counts
    assert set(counts.values()) == {3}, {k: v for k, v in counts.items() if v != 3}


def test_the_model_runs_under_inference_mode() -> None:
    model = _model("full").eval()
    inputs = _inputs(2, 64, 64)
    with torch.no_grad():
        expected = model(**inputs)
    with torch.inference_mode():
        out = model(**inputs)
    assert torch.equal(out["boxes"], expected["boxes"])
    assert torch.allclose(out["logits"], expected["logits"])


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


@pytest.mark.parametrize(("size", "window", "stride"),
                         [(512, 128, 32), (64, 16, 4), (100, 24, 6), (96, 40, 6), (70, 8, 8)])
def test_window_means_are_the_means_of_every_box(size, window, stride) -> None:
    saliency = torch.rand(2, size, size + 6, generator=torch.Generator().manual_seed(size),
                          dtype=torch.float64)
    means = window_means(saliency, window, stride)
    ny, nx = (size - window) // stride + 1, (size + 6 - window) // stride + 1
    assert means.shape == (2, ny, nx)
    # every box, against pooling with the box itself
    torch.testing.assert_close(means, F.avg_pool2d(saliency.unsqueeze(1), window,
                                                   stride).squeeze(1), rtol=1e-12, atol=0)
    for b, i, j in [(0, 0, 0), (1, ny - 1, nx - 1)]:  # and two boxes by hand
        box = saliency[b, i * stride : i * stride + window, j * stride : j * stride + window]
        assert box.shape == (window, window)
        assert torch.isclose(means[b, i, j], box.mean(), rtol=1e-12)


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


def test_grad_cam_leaves_gradients_and_statistics_unchanged() -> None:
    model = _model("mrfm").train()
    inputs = _inputs(2, 64, 64)
    out = model(**inputs)
    out["logits"].square().mean().backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    branch = model.he_branch
    stages = branch.target.encoder(inputs["he"])
    levels = branch.target.decoder(stages)
    cam = branch.saliency(levels[branch.cam_level], stages)
    assert cam.shape == (2, 64, 64)
    assert cam.min() >= 0
    assert cam.max() == 1
    assert not cam.requires_grad
    after = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    moved = {n for n, b in model.named_buffers() if not torch.equal(b, buffers[n])}
    assert moved == {n for n in buffers if n.startswith("he_branch.target.")}  # by the 2nd pass
    assert all("num_batches_tracked" not in n or buffers[n] + 1 == dict(
        model.named_buffers())[n] for n in moved)


def test_grad_cam_inside_forward_does_not_change_training_gradients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """mrfm: the CAM picks the box the detail branch sees. The gradients of a loss (and the
    BatchNorm statistics) must be those of the same forward with the CAM computed elsewhere."""
    inputs = _inputs(2, 64, 64)

    def step(model: EGCMF) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        out = model(**inputs)
        (out["logits"].square().mean() + out["logits_high"].square().mean()).backward()
        return [p.grad.clone() for p in model.parameters()], dict(model.state_dict())

    inline, inline_state = step(_model("mrfm").train())
    branch = _model("mrfm").train().he_branch
    stages = branch.target.encoder(inputs["he"])
    fixed = branch.saliency(branch.target.decoder(stages)[branch.cam_level], stages)
    model = _model("mrfm").train()  # fresh statistics: the passes above moved them
    monkeypatch.setattr(model.he_branch, "saliency", lambda *_: fixed)
    elsewhere, elsewhere_state = step(model)
    assert all(torch.equal(a, b) for a, b in zip(inline, elsewhere, strict=True))
    assert all(torch.equal(inline_state[k], elsewhere_state[k]) for k in inline_state)


def test_grad_cam_reads_tumour_probability_and_finds_the_tumour() -> None:
    """A known case: a stride-8 feature map whose channel 0 drives the tumour logit in one place,
    seen through an upsampling tail and a 1x1 head. The CAM is high there and the box lands on
    it; a channel that raises every logit alike (no change in probability) is ignored."""
    head = torch.nn.Conv2d(4, 3, 1)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.weight[1, 0] = 4.0  # class 1 (tumour) reads channel 0
        head.weight[:, 1] = 5.0  # channel 1 raises all logits equally: softmax ignores it

    def tail(x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x, scale_factor=8, mode="bilinear", align_corners=False)
        return F.conv2d(up, head.weight.detach(), head.bias.detach())

    feats = torch.zeros(1, 4, 8, 8)
    feats[0, 0, 5:7, 1:3] = 1.0  # tumour evidence around 10x pixels (40..56, 8..24)
    feats[0, 1, 0:3, 5:8] = 3.0  # strong but class-neutral activation elsewhere
    cam = grad_cam(feats, tail, [1, 2], (64, 64))
    assert cam.shape == (1, 64, 64)
    assert cam[0, 44:52, 12:20].min() > 0.9
    assert cam[0, 0:24, 40:64].max() < 0.05
    assert window_search(cam, 16, 4)[0].tolist() == [40, 8, 56, 24]


def _crowded(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Images whose tumour is a disk of crowded nuclei among sparse ones, at a known place: as in
    tissue, a pixel alone does not tell tumour from stroma, its neighbourhood does."""
    g = torch.Generator().manual_seed(seed)
    images, masks, centres = [], [], []
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    colour = torch.tensor([1.5, -1.0, 0.8])[:, None, None]
    for i in range(n):
        cy, cx = (int(v) for v in torch.randint(12, 52, (2,), generator=g))
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 < 10**2
        dots = (torch.rand(64, 64, generator=g) < torch.where(disk, 0.12, 0.012)).float()
        nuclei = F.max_pool2d(dots[None, None], 3, 1, 1)[0]  # 3 px nuclei
        images.append(torch.randn(3, 64, 64, generator=g) * 0.3 + nuclei * colour)
        masks.append(disk.long() * (1 + i % 2))
        centres.append((cy, cx))
    return torch.stack(images), torch.stack(masks), centres


def test_trained_target_branch_puts_the_key_region_on_the_tumour() -> None:
    model = _model("mrfm")
    optimizer = torch.optim.Adam(model.he_branch.target.parameters(), lr=3e-3)
    images, masks, _ = _crowded(64, seed=0)
    for step in range(150):
        pick = slice(8 * (step % 8), 8 * (step % 8 + 1))
        optimizer.zero_grad()
        logits, _ = model.he_branch.target(images[pick])
        F.cross_entropy(logits, masks[pick]).backward()
        optimizer.step()
    model.eval()
    test, _, centres = _crowded(32, seed=1)
    with torch.no_grad():
        boxes = model(he=test, he_40x=F.interpolate(test, scale_factor=4))["boxes"]
    hits = sum(y0 <= cy < y1 and x0 <= cx < x1
               for (y0, x0, y1, x1), (cy, cx) in zip(boxes.tolist(), centres, strict=True))
    centre_hits = sum(24 <= cy < 40 and 24 <= cx < 40 for cy, cx in centres)
    assert hits >= 24, (hits, centre_hits)  # 28 of 32 measured
    assert hits > centre_hits + 12


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


def test_torchvision_vgg16_bn_weights_load_into_every_encoder(tmp_path, caplog) -> None:
    """`model.weights`: a torchvision VGG16-BN state dict (by path) initialises all four
    encoders; the 2-channel edge encoder answers grey as the RGB filters do."""
    from torchvision.models import vgg16_bn

    from egcmf_model.engine import build_model
    from egcmf_model.vgg_unet import VGGEncoder

    torch.manual_seed(0)
    reference = vgg16_bn(weights=None).state_dict()
    state = {k: v for k, v in reference.items() if k.startswith("features.")}
    state["classifier.6.bias"] = reference["classifier.6.bias"]  # not ours: skipped
    torch.save(state, tmp_path / "vgg16_bn.pth")
    cfg = dataclasses.replace(TINY, width=1.0, weights=str(tmp_path / "vgg16_bn.pth"))
    model = build_model(cfg, ("background", "in_situ", "invasive"))
    assert "missing" not in caplog.text
    encoders = [m for m in model.modules() if isinstance(m, VGGEncoder)]
    assert len(encoders) == 4  # target, detail, CK5/6 semantic, edge
    for encoder in encoders:
        for key, value in encoder.features.state_dict().items():
            if key != "0.weight":
                assert torch.equal(value, state[f"features.{key}"]), key
    rgb_conv, edge_conv = model.he_branch.target.encoder.features[0], \
        model.ck56_branch.edge_net.encoder.features[0]
    assert torch.equal(rgb_conv.weight, state["features.0.weight"])
    grey = torch.full((1, 3, 8, 8), 0.7)
    assert torch.allclose(edge_conv(grey[:, :2]), rgb_conv(grey), atol=1e-5)


def test_a_checkpoint_of_this_network_gives_each_encoder_its_own_weights(tmp_path) -> None:
    """`model.weights` may be a checkpoint of this network (one trained on public data): each
    encoder takes its counterpart's weights, the rest keeps its own initialisation; a
    checkpoint of another network is refused with the encoder that does not fit."""
    from egcmf_model.checkpoint import save_checkpoint
    from egcmf_model.engine import build_model, encoders

    classes = ("background", "in_situ", "invasive")
    cfg = load_config("tiny", overrides=["model.norm=group"])
    torch.manual_seed(1)
    public = build_model(cfg.model, classes)
    save_checkpoint(tmp_path / "public.pt", public, cfg, classes)
    torch.manual_seed(2)
    model = build_model(dataclasses.replace(cfg.model, weights=str(tmp_path / "public.pt")),
                        classes)
    assert len(encoders(model)) == 4
    state, own = public.state_dict(), model.state_dict()
    in_encoders = {f"{name}.{key}" for name, m in encoders(model).items()
                   for key in m.state_dict()}
    for key, value in own.items():
        if key in in_encoders:
            assert torch.equal(value, state[key]), key
        elif value.dim() > 1:  # randomly initialised: convolutions and linear layers
            assert not torch.equal(value, state[key]), key
    unet = load_config("tiny", overrides=["model.norm=group", "model.variant=unet",
                                          "model.width=0.25"])
    save_checkpoint(tmp_path / "other.pt", build_model(unet.model, classes), unet, classes)
    with pytest.raises(ValueError, match=r"other\.pt: its encoder he_branch\.target\.encoder "
                                         r"does not fit"):
        build_model(dataclasses.replace(cfg.model, weights=str(tmp_path / "other.pt")), classes)
    torch.save(public.state_dict(), tmp_path / "bare.pt")  # a state dict of this network
    bare = build_model(dataclasses.replace(cfg.model, weights=str(tmp_path / "bare.pt")), classes)
    assert torch.equal(bare.he_branch.detail.encoder.features[0].weight,
                       public.he_branch.detail.encoder.features[0].weight)
    batch = load_config("tiny")  # the same network with BatchNorm
    save_checkpoint(tmp_path / "batch.pt", build_model(batch.model, classes), batch, classes)
    with pytest.raises(ValueError, match=r"does not fit this network \(model\.norm=batch "
                                         r"there, group here\)"):
        build_model(dataclasses.replace(cfg.model, weights=str(tmp_path / "batch.pt")), classes)
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match=r"tensor\.pt: neither a VGG16-BN state dict"):
        build_model(dataclasses.replace(cfg.model, weights=str(tmp_path / "tensor.pt")), classes)
    from torchvision.models import vgg16_bn

    torch.save(vgg16_bn(weights=None).state_dict(), tmp_path / "vgg.pth")
    with pytest.raises(ValueError, match=r"vgg\.pth: features\.0\.weight is \(64, 3, 3, 3\) "
                                         r"there .* need model\.width=1\.0"):
        build_model(dataclasses.replace(cfg.model, weights=str(tmp_path / "vgg.pth")), classes)
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"model\.weights .*broken\.pt: not a readable"):
        build_model(dataclasses.replace(cfg.model, weights=str(tmp_path / "broken.pt")), classes)
