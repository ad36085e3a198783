"""Training, checkpoints and the model commands, on the tiny preset."""

from __future__ import annotations

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


def doc_tiles(out: Path) -> list[dict]:
    return json.loads((out / "region.json").read_text())["tiles"]


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


def test_train_never_overwrites_a_run_and_resumes_to_its_own_epochs(
        synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run folder is continued with --resume, never trained over: a second `train` into it
    is refused and its best model stays; --resume without --epochs goes on to the epochs the
    run set out with; a folder without last.pt has nothing to resume."""
    run, data = tmp_path / "run", ["--data", str(synth_root / "site_01"),
                                   "--set", "model.variant=unet"]
    assert main(["train", *data, "--epochs", "2", "--out", str(run)]) == 0
    (run / "last.pt").rename(tmp_path / "last.pt")  # as if it stopped after epoch 1
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    torch.save({**torch.load(tmp_path / "last.pt", weights_only=True), "epoch": 1},
               run / "last.pt")
    best = (run / "best.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", *data, "--epochs", "1", "--out", str(run)]) == 2
    assert "holds a training run (last.pt, best.pt, metrics.jsonl)" in capsys.readouterr().err
    assert (run / "best.pt").read_bytes() == best
    assert main(["train", *data, "--out", str(run), "--resume"]) == 0  # the preset says 7
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]
    assert main(["train", *data, "--out", str(run), "--resume"]) == 2
    assert "has trained 2 epochs" in capsys.readouterr().err
    assert main(["train", *data, "--out", str(tmp_path / "empty"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


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
    assert main([*args, "--out", str(tmp_path / "b")]) == 130  # stopped, in one line
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
    assert all(isinstance(t["fallback"], bool) for t in doc_tiles(out))
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


def _vgg_unet_parameters(cin: int, classes: int, width: float, decoder_width: float) -> int:
    """Counted from the VGG16 ("D") layout: 13 convs with bias + BatchNorm, a UNet decoder of
    4 blocks of two bias-free 3x3 convs + BatchNorm, a 1x1 head."""
    scale = lambda c: max(8, round(c * width))  # noqa: E731
    count, c = 0, cin
    for out in (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512):
        count += 9 * c * scale(out) + scale(out) + 2 * scale(out)
        c = scale(out)
    skips = [scale(x) for x in (512, 256, 128, 64)]
    for skip in skips:
        out = max(8, round(skip * decoder_width))
        count += 9 * (c + skip) * out + 2 * out + 9 * out * out + 2 * out
        c = out
    return count + c * classes + classes


def _mrfm_parameters(width: float, decoder_width: float, reduction: int) -> int:
    """SE on the detail's stride-8 level, 1x1 to the target's stride-2 level, 3x3 smoothing."""
    detail = max(8, round(max(8, round(512 * width)) * decoder_width))
    target = max(8, round(max(8, round(128 * width)) * decoder_width))
    hidden = max(4, detail // reduction)
    se = 2 * detail * hidden + hidden + detail
    return se + detail * target + target + 9 * target * target + 2 * target


def test_paper_preset_has_table_vi_size() -> None:
    """Table VI: 78.5 M parameters; within 10 %, as SPEC asks."""
    model = build_model(load_config("paper").model, ("background", "in_situ", "invasive"))
    params = sum(p.numel() for p in model.parameters())
    assert abs(params - 78.5e6) < 0.1 * 78.5e6
    unet = _vgg_unet_parameters(3, 3, 1.0, 0.5)
    assert sum(p.numel() for p in model.he_branch.target.parameters()) == unet


def test_profile_json_contract(capsys) -> None:
    assert main(["profile", "--preset", "tiny", "--variant", "mrfm", "--runs", "1", "--json"]) == 0
    doc = _last_json(capsys)
    assert {"params", "gflops", "input", "infer_s", "device"} <= set(doc)
    tiny = load_config("tiny").model
    target = _vgg_unet_parameters(3, 3, tiny.width, tiny.decoder_width)
    assert doc["params"] == 2 * target + _mrfm_parameters(tiny.width, tiny.decoder_width,
                                                          tiny.se_reduction)
    assert doc["input"] == [3, 64, 64]
    assert doc["gflops"] > 0
    assert doc["device"] == "cpu"


def test_predict_picks_a_salient_region_and_falls_back_to_the_centre() -> None:
    from egcmf_model.predict import most_salient

    def box(y: int, x: int, saliency: float, fallback: bool) -> dict:
        return {"box_40x": [y, x, y + 64, x + 64], "saliency": saliency, "fallback": fallback}

    tiles = [box(0, 0, 0.0, True), box(0, 256, 0.4, False), box(256, 256, 0.9, False)]
    assert most_salient(tiles, (512, 512)) is tiles[2]
    flat = [box(0, 0, 0.0, True), box(224, 224, 0.0, True), box(448, 448, 0.0, True)]
    assert most_salient(flat, (512, 512)) is flat[1]  # nearest the centre, not the top-left
    assert most_salient([], (512, 512)) is None


def test_an_undefined_validation_dice_can_be_the_best(
    synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NaN Dice = no tumour in the validation truth and none predicted: a perfect epoch."""
    from egcmf_model import trainer

    real, dices = trainer.evaluate, iter([0.3, float("nan"), 0.2])

    def evaluate(*a, **k):
        return {**real(*a, **k), "dice": next(dices)}

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    assert main(["train", "--data", str(synth_root / "site_01"), "--epochs", "3",
                 "--out", str(tmp_path), "--set", "model.variant=unet"]) == 0
    assert torch.load(tmp_path / "best.pt", weights_only=False)["epoch"] == 2


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
    """train.amp=bf16, train.channels_last and train.compile are GPU options: the CPU trains
    as without, its fusion modules uncompiled."""
    from egcmf_model.engine import GpuSpeed

    plain, a = _one_step(synth_root, "cpu", GpuSpeed())
    fast, b = _one_step(synth_root, "cpu", GpuSpeed(amp="bf16", channels_last=True, compile=True))
    assert plain == fast
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                  b.state_dict().values(), strict=True))
    assert all(m._compiled_call_impl is None for m in b.modules())
    assert load_config("tiny").train.amp == "none"
    assert not load_config("tiny").train.compile
    # bitwise reproducibility is shown for the eager network: deterministic runs do not compile
    asked = ["train.compile=true"]
    assert GpuSpeed.of(load_config("tiny", overrides=asked).train).compile
    assert not GpuSpeed.of(load_config("tiny", overrides=[*asked, "train.deterministic=true"]
                                       ).train).compile


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
    # gates stay in bf16: autocast runs sum() in float32, which would turn each gated map so
    from egcmf_model.blocks import ChannelAttention
    attention = ChannelAttention(16, 4).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        x = torch.randn(2, 16, 8, 8, device="cuda", dtype=torch.bfloat16)
        assert attention(x).dtype == torch.bfloat16


def _eager_and_compiled_step(root: Path, device: str, backend: str) -> list[tuple]:
    """One forward, backward and SGD step of the same network run eagerly and with its fusion
    modules compiled: ``(loss, gradients, state dict after the step)`` of each; checks that
    the compiled run did run compiled graphs, one per fusion module at least."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from egcmf_model.engine import compile_fusion

    batch, classes = _batch(root)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    cfg = load_config("tiny").model
    torch.manual_seed(0)
    eager = build_model(cfg, classes).to(device).train()
    compiled = build_model(cfg, classes).to(device).train()
    compiled.load_state_dict(eager.state_dict())
    counter = CompileCounterWithBackend(backend)
    compile_fusion(compiled, True, backend=counter)
    after = []
    for model in (eager, compiled):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # linear in the gradient
        loss = EGCMFLoss(0.5)(forward(model, batch), batch)[0]
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        optimizer.step()
        after.append((loss.detach(), grads, model.state_dict()))
    assert counter.frame_count >= 8  # four EDFM, four MSFFM levels: none fell back to eager
    return after


def _assert_same_step(after: list[tuple], rtol: float, atol: float) -> None:
    (loss_a, grads_a, state_a), (loss_b, grads_b, state_b) = after
    torch.testing.assert_close(loss_b, loss_a, rtol=rtol, atol=atol)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol)
    assert list(state_b) == list(state_a)  # the same keys: checkpoints and FL messages hold
    for key in state_a:
        torch.testing.assert_close(state_b[key], state_a[key], rtol=rtol, atol=atol, msg=key)


def test_compiled_fusion_modules_compute_what_the_eager_ones_do(synth_root: Path,
                                                               monkeypatch) -> None:
    """train.compile's graphs, traced here with the aot_eager back end (the CPU stand-in for a
    GPU's compiler): the same loss, gradients and weights after a step as the modules run
    eagerly, and the same state dict keys. GpuSpeed compiles them for a GPU only."""
    from egcmf_model import engine
    from egcmf_model.engine import COMPILED, GpuSpeed

    monkeypatch.setattr(engine, "c_compiler", lambda: "cc")  # nothing is built: no compiler
    model = build_model(load_config("tiny").model, ("background", "tumour"))
    GpuSpeed(compile=True).place(model, torch.device("cuda"))  # no GPU needed to mark them
    fusion = [m for m in model.modules() if isinstance(m, COMPILED)]
    assert len(fusion) == 8
    assert all(m._compiled_call_impl is not None for m in fusion)
    GpuSpeed(compile=True).place(model, torch.device("cpu"))
    assert all(m._compiled_call_impl is None for m in fusion)
    _assert_same_step(_eager_and_compiled_step(synth_root, "cpu", "aot_eager"), 1e-4, 1e-6)


def test_compiling_without_a_c_compiler_is_refused_in_one_line(monkeypatch) -> None:
    from egcmf_model import engine

    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(engine.shutil, "which", lambda name: None)
    model = build_model(load_config("tiny").model, ("background", "tumour"))
    with pytest.raises(ValueError, match=r"train.compile needs a C compiler .* leave "
                                         r"train.compile off"):
        engine.GpuSpeed(compile=True).place(model, torch.device("cuda"))
    engine.GpuSpeed(compile=True).place(model, torch.device("cpu"))  # the CPU ignores it


@pytest.mark.gpu
@pytest.mark.timeout(900)  # compiling takes minutes: each module, forward and backward
def test_compiled_fusion_modules_train_and_evaluate_on_a_gpu(synth_root: Path) -> None:
    from egcmf_model.engine import COMPILED, GpuSpeed, evaluate

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _assert_same_step(_eager_and_compiled_step(synth_root, "cuda", "inductor"), 1e-3, 1e-5)
    fast, model = _one_step(synth_root, "cuda", GpuSpeed(compile=True))
    fusion = [m for m in model.modules() if isinstance(m, COMPILED)]
    assert len(fusion) == 8  # four EDFM, four MSFFM levels
    assert all(m._compiled_call_impl is not None for m in fusion)
    assert np.isfinite(fast["loss"])
    batch, classes = _batch(synth_root)
    result = evaluate(model, [batch], classes, torch.device("cuda"), EGCMFLoss(0.5),
                      GpuSpeed(compile=True))
    assert np.isfinite(result["loss"])
    assert all(m._compiled_call_impl is None for m in fusion)  # evaluation runs them eagerly


def test_the_benchmark_stand_in_moves_every_weight_alike_in_any_memory_layout() -> None:
    """``train.skip``'s stand-in for training moves every float weight by its share of one
    cyclic noise sequence, in place: a channels-last copy of the network moves exactly as the
    contiguous one, and the noise wraps around its period across tensors."""
    from fl_client.train import NOISE_PERIOD, stand_in_update

    cfg = load_config("tiny")
    torch.manual_seed(0)
    plain = build_model(cfg.model, cfg.data.classes)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    layout = build_model(cfg.model, cfg.data.classes).to(memory_format=torch.channels_last)
    layout.load_state_dict(before)
    assert any(not v.is_contiguous() for v in layout.state_dict().values())
    stand_in_update(plain, seed=7)
    stand_in_update(layout, seed=7)
    floats = [k for k, v in before.items() if v.is_floating_point()]
    moved = torch.cat([(plain.state_dict()[k] - before[k]).reshape(-1) for k in floats])
    assert moved.numel() > NOISE_PERIOD  # the sequence wraps around
    torch.testing.assert_close(moved[NOISE_PERIOD:], moved[:moved.numel() - NOISE_PERIOD],
                               rtol=0, atol=1e-7)  # the same noise again, to float32 rounding
    assert all(torch.equal(plain.state_dict()[k], layout.state_dict()[k]) for k in before)
