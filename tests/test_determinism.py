"""train.deterministic: the deterministic replacements equal PyTorch's kernels, and on a GPU
(`gpu` marker) training twice gives bitwise-identical weights with no non-deterministic op."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from egcmf_model import determinism
from egcmf_model.config import load_config
from egcmf_model.data.dataset import RoiDataset
from egcmf_model.data.source import open_sites
from egcmf_model.engine import build_model, forward, seed_everything
from egcmf_model.losses import EGCMFLoss

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize(("size", "out"), [((4, 4), (8, 8)), ((5, 7), (10, 14)),
                                           ((3, 5), (8, 9)), ((8, 8), (4, 4))])
def test_matmul_bilinear_equals_interpolate_with_its_gradient(size, out) -> None:
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    expected = F.interpolate(x, size=out, mode="bilinear", align_corners=False)
    (grad_expected,) = torch.autograd.grad(expected.square().sum(), x)
    got = determinism.bilinear(x, out)
    (grad_got,) = torch.autograd.grad(got.square().sum(), x)
    assert torch.allclose(got, expected, atol=1e-12)
    assert torch.allclose(grad_got, grad_expected, atol=1e-12)


def test_gather_cross_entropy_equals_torch_and_ignores_the_ignore_label() -> None:
    logits = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 5, 6))
    target[0, :2] = 255
    assert determinism.cross_entropy(logits, target, 255).item() == pytest.approx(
        F.cross_entropy(logits, target, ignore_index=255).item(), rel=1e-12)


def test_cpu_runs_keep_the_usual_kernels() -> None:
    assert not determinism.wanted(torch.zeros(1))


@pytest.fixture
def deterministic_mode():
    yield
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = False
    torch.backends.cuda.enable_flash_sdp(True)
    torch.backends.cuda.enable_mem_efficient_sdp(True)
    torch.backends.cuda.enable_cudnn_sdp(True)


def _train_on_gpu(batch: dict[str, torch.Tensor], classes: tuple[str, ...], steps: int
                  ) -> dict[str, torch.Tensor]:
    cfg = load_config("tiny", overrides=["train.deterministic=true"])
    seed_everything(0, deterministic=True)
    model = build_model(cfg.model, classes).cuda().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    gpu = {k: v.cuda() for k, v in batch.items()}
    for _ in range(steps):
        optimizer.zero_grad()
        EGCMFLoss(0.5)(forward(model, gpu), gpu)[0].backward()
        optimizer.step()
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


@pytest.mark.gpu
@needs_cuda
def test_deterministic_training_on_a_gpu_is_bitwise_reproducible(
    synth_root: Path, deterministic_mode: None
) -> None:
    source = open_sites(synth_root)
    data = RoiDataset(source.split("train")[:4], source.classes, 64)
    keys = ("he", "he_40x", "ck56", "edge", "mask", "mask_40x", "edge_target")
    batch = {k: torch.stack([data[i][k] for i in range(4)]) for k in keys}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = _train_on_gpu(batch, source.classes, steps=5)
        second = _train_on_gpu(batch, source.classes, steps=5)
    nondeterministic = [str(w.message) for w in caught if "determinis" in str(w.message)]
    assert nondeterministic == []
    assert first.keys() == second.keys()
    assert [k for k in first if not torch.equal(first[k], second[k])] == []


@pytest.mark.gpu
@needs_cuda
def test_deterministic_egcmf_train_on_a_gpu_repeats_its_metrics(
    synth_root: Path, tmp_path: Path, deterministic_mode: None
) -> None:
    from egcmf_model.cli import main

    args = ["train", "--data", str(synth_root / "site_01"), "--epochs", "2",
            "--set", "train.deterministic=true", "--set", "train.device=cuda"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == (
        tmp_path / "b" / "metrics.jsonl").read_text()
