"""Training, checkpoints and the model commands, on the tiny preset."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from egcmf_model.checkpoint import load_model, save_checkpoint
from egcmf_model.cli import main
from egcmf_model.config import load_config
from egcmf_model.data.dataset import RoiDataset
from egcmf_model.data.io import write_png
from egcmf_model.data.source import open_sites
from egcmf_model.engine import build_model, forward
from egcmf_model.losses import EGCMFLoss
from egcmf_model.metrics import SegmentationMetrics

KEYS = ("he", "he_40x", "ck56", "edge", "mask", "mask_40x", "edge_target")


def _batch(root: Path) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    source = open_sites(root)
    dataset = RoiDataset(source.split("train")[:2], source.classes, 64)
    return {k: torch.stack([dataset[i][k] for i in range(2)]) for k in KEYS}, source.classes


def test_full_network_overfits_a_tiny_batch(synth_root: Path) -> None:
    batch, classes = _batch(synth_root)
    torch.manual_seed(0)
    model = build_model(load_config("tiny").model, classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn, dice = EGCMFLoss(0.5), 0.0
    for step in range(1, 151):
        model.train()
        optimizer.zero_grad()
        loss_fn(forward(model, batch), batch)[0].backward()
        optimizer.step()
        if step % 10 == 0:
            model.eval()
            metrics = SegmentationMetrics(classes)
            with torch.no_grad():
                metrics.update(forward(model, batch)["logits"], batch["mask"])
            dice = metrics.aggregate()["dice"]
            if dice > 0.9:
                break
    assert dice > 0.9


def test_checkpoint_reloads_bit_identically(synth_root: Path, tmp_path: Path) -> None:
    batch, classes = _batch(synth_root)
    cfg = load_config("tiny", overrides=["model.variant=mrfm+edm"])
    model = build_model(cfg.model, classes)
    model.train()
    forward(model, batch)  # move BatchNorm statistics away from their initial values
    model.eval()
    save_checkpoint(tmp_path / "m.pt", model, cfg, classes, epoch=3)
    loaded, loaded_cfg, loaded_classes, payload = load_model(tmp_path / "m.pt")
    assert loaded_cfg == cfg
    assert loaded_classes == classes
    assert payload["epoch"] == 3
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(forward(model, batch)["logits"], forward(loaded.eval(), batch)["logits"])


def test_broken_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"bad\.pt"):
        load_model(tmp_path / "bad.pt")


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_train_evaluate_predict_commands(synth_root: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", "--data", str(synth_root), "--epochs", "2", "--out", str(run),
                 "--set", "model.variant=unet"]) == 0
    capsys.readouterr()
    assert {"last.pt", "best.pt", "metrics.jsonl"} <= {p.name for p in run.iterdir()}
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2

    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(synth_root),
                 "--split", "test", "--json"]) == 0
    doc = _last_json(capsys)
    assert set(doc) == {"acc", "dice", "miou", "per_class", "confusion"}
    assert set(doc["per_class"]) == {"background", "in_situ", "invasive"}
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(synth_root)]) == 0
    assert "Dice(%)" in capsys.readouterr().out


def test_train_defaults_to_full_with_ck56_and_resumes(synth_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["train", "--data", str(synth_root / "site_01"), "--epochs", "1",
                 "--out", str(run)]) == 0
    first = torch.load(run / "last.pt", weights_only=True)
    assert first["config"]["model"]["variant"] == "full"
    assert first["epoch"] == 1
    assert main(["train", "--data", str(synth_root / "site_01"), "--epochs", "2",
                 "--out", str(run), "--resume"]) == 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]


def test_resume_after_a_crash_equals_an_uninterrupted_run(
    synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from egcmf_model import trainer

    args = ["train", "--data", str(synth_root / "site_02"), "--epochs", "3",
            "--set", "model.variant=unet"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0

    real, calls = trainer.train_epoch, []

    def crash_in_epoch_two(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(trainer, "train_epoch", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--out", str(tmp_path / "b")])
    monkeypatch.setattr(trainer, "train_epoch", real)
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["epoch"] == 1
    assert main([*args, "--out", str(tmp_path / "b"), "--resume"]) == 0
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert b["epoch"] == 3
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == (
        tmp_path / "b" / "metrics.jsonl").read_text()


def test_predict_writes_everything_at_the_input_size(synth_root: Path, tmp_path: Path,
                                                     capsys) -> None:
    cfg = load_config("tiny")
    source = open_sites(synth_root)
    model = build_model(cfg.model, source.classes)
    save_checkpoint(tmp_path / "m.pt", model, cfg, source.classes)
    rng = np.random.default_rng(0)
    he = rng.integers(0, 255, (301, 263, 3)).astype(np.uint8)  # odd sizes, two tiles wide
    write_png(tmp_path / "he.png", he)
    write_png(tmp_path / "ck.png", he)
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(tmp_path / "m.pt"),
                 "--he", str(tmp_path / "he.png"), "--ck56", str(tmp_path / "ck.png"),
                 "--out", str(out)]) == 0
    doc = _last_json(capsys)
    with Image.open(out / "mask.png") as mask:
        assert mask.size == (263, 301)
        assert mask.mode == "L"
    for name in ("overlay.png", "heatmap.png"):
        with Image.open(out / name) as image:
            assert image.size == (263, 301)
            assert image.mode == "RGB"
    region = json.loads((out / "region.json").read_text())
    assert region["box_10x"] == doc["box_10x"]
    assert [4 * v for v in region["box_10x"]] == region["box_40x"]
    y0, x0, y1, x1 = region["box_10x"]
    assert y1 - y0 == x1 - x0 == 16


def test_predict_rejects_mismatched_pair(synth_root: Path, tmp_path: Path, capsys) -> None:
    cfg = load_config("tiny")
    model = build_model(cfg.model, ("background", "in_situ", "invasive"))
    save_checkpoint(tmp_path / "m.pt", model, cfg, ("background", "in_situ", "invasive"))
    write_png(tmp_path / "he.png", np.zeros((64, 64, 3), np.uint8))
    write_png(tmp_path / "ck.png", np.zeros((64, 80, 3), np.uint8))
    assert main(["predict", "--checkpoint", str(tmp_path / "m.pt"),
                 "--he", str(tmp_path / "he.png"), "--ck56", str(tmp_path / "ck.png"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "same size" in capsys.readouterr().err


def test_profile_json_contract(capsys) -> None:
    assert main(["profile", "--preset", "tiny", "--variant", "mrfm", "--runs", "1", "--json"]) == 0
    doc = _last_json(capsys)
    assert {"params", "gflops", "input", "infer_s", "device"} <= set(doc)
    model = build_model(dataclasses.replace(load_config("tiny").model, variant="mrfm"),
                        ("a", "b", "c"))
    assert doc["params"] == sum(p.numel() for p in model.parameters())
    assert doc["input"] == [3, 64, 64]
    assert doc["gflops"] > 0
    assert doc["device"] == "cpu"


def _one_step(root: Path, device: str, speed) -> tuple[dict[str, float], torch.nn.Module]:
    from egcmf_model.engine import train_epoch

    batch, classes = _batch(root)
    torch.manual_seed(0)
    model = build_model(load_config("tiny").model, classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    stats = train_epoch(model, [batch], optimizer, torch.device(device), EGCMFLoss(0.5),
                        speed=speed)
    return stats, model


def test_gpu_speed_options_change_nothing_on_the_cpu(synth_root: Path) -> None:
    """train.amp=bf16 and train.channels_last are GPU options: the CPU trains as without."""
    from egcmf_model.engine import GpuSpeed

    plain, a = _one_step(synth_root, "cpu", GpuSpeed())
    fast, b = _one_step(synth_root, "cpu", GpuSpeed(amp="bf16", channels_last=True))
    assert plain == fast
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                  b.state_dict().values(), strict=True))
    assert load_config("tiny").train.amp == "none"


@pytest.mark.gpu
def test_bf16_autocast_and_channels_last_train_on_a_gpu(synth_root: Path) -> None:
    from egcmf_model.engine import GpuSpeed

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    plain, _ = _one_step(synth_root, "cuda", GpuSpeed())
    fast, model = _one_step(synth_root, "cuda", GpuSpeed(amp="bf16", channels_last=True))
    assert np.isfinite(fast["loss"])
    assert abs(fast["loss"] - plain["loss"]) < 0.05 * abs(plain["loss"])
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
