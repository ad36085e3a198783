"""Train-step time of the `full` network vs the sum of its four VGG-UNets trained alone.

The fusion modules (MRFM, EDFM, MSFFM), Grad-CAM and the second decoder pass should add no more
than 30 % to the cost of the four encoder-decoders on a GPU, 50 % on the CPU. The options, each
measurable alone: ``--amp bf16`` (autocast), ``--channels-last``, ``--compile`` (the fusion
modules compiled, as ``train.compile`` does on a GPU; here on any device), ``--cudnn-benchmark``.
The peak GPU memory is that of the ``full`` step alone.

    python bench/fusion_overhead.py --preset tiny --size 128 --device cpu --steps 5
    python bench/fusion_overhead.py --preset paper --device cuda --steps 10 --amp bf16
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time

import torch
import torch.nn.functional as F

from egcmf_model.config import load_config
from egcmf_model.engine import build_model, compile_fusion, forward, pick_device
from egcmf_model.losses import EGCMFLoss
from egcmf_model.vgg_unet import VGGUNet

CLASSES = ("background", "in_situ", "invasive")


def batch_of(size: int, device: torch.device, b: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    return {"he": r(b, 3, size, size), "he_40x": r(b, 3, 4 * size, 4 * size),
            "ck56": r(b, 3, size, size), "edge": r(b, 2, size, size),
            "mask": torch.randint(0, 3, (b, size, size), generator=g).to(device),
            "mask_40x": torch.randint(0, 3, (b, 4 * size, 4 * size), generator=g).to(device),
            "edge_target": torch.randint(0, 2, (b, size, size), generator=g).float().to(device)}


def laid_out(batch: dict[str, torch.Tensor], layout: torch.memory_format
             ) -> dict[str, torch.Tensor]:
    """The batch's images in ``layout`` (channels-last or the standard one)."""
    return {k: v.contiguous(memory_format=layout) if v.dim() == 4 else v
            for k, v in batch.items()}


def timed(step, steps: int, device: torch.device, warmup: int = 1) -> float:
    """Mean seconds of ``step`` after ``warmup`` calls (allocations, cuDNN autotuning)."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def autocast(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    return (torch.autocast(device.type, dtype=torch.bfloat16) if amp == "bf16"
            else contextlib.nullcontext())


def train_step(model, optimizer, loss_of, amp: str, device: torch.device):
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(amp, device):
            loss = loss_of(model)
        loss.backward()
        optimizer.step()
    return step


def sdpa_math_calls(model, batch) -> int:
    """How many SDPA calls of one forward took the math path (0 when the fused kernels ran)."""
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                                 ) as prof:
        forward(model, batch)
    return sum(e.count for e in prof.key_averages()
               if e.key == "aten::_scaled_dot_product_attention_math")


def peak_gib(device: torch.device) -> float | None:
    return (round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda"
            else None)


def step_options(description: str) -> argparse.ArgumentParser:
    """The options of a training step's measurement: model size, device, precision, layout."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--size", type=int, help="10x input side (default: the preset's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--amp", default="none", choices=("none", "bf16"))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="let cuDNN time its algorithms for each shape first")
    return parser


def main() -> None:
    parser = step_options(__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true",
                        help="compile the fusion modules, as train.compile does on a GPU "
                             "(the UNets have none)")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    cfg = load_config(args.preset).model
    cfg = dataclasses.replace(cfg, in_size=args.size or cfg.in_size, variant="full")
    device = pick_device(args.device)
    batch = batch_of(cfg.in_size, device)
    loss_fn, compile_s = EGCMFLoss(0.5), None
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    batch = laid_out(batch, layout)
    full = build_model(cfg, CLASSES).to(device, memory_format=layout).train()
    full_step = train_step(full, torch.optim.Adam(full.parameters()),
                           lambda m: loss_fn(forward(m, batch), batch)[0], args.amp, device)
    if args.compile:
        compile_fusion(full, True)
        started = time.perf_counter()
        full_step()
        compile_s = round(time.perf_counter() - started, 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_full = timed(full_step, args.steps, device)
    peak = peak_gib(device)
    compile_fusion(full, False)  # the profile below needs no graphs of its own
    math_calls = sdpa_math_calls(full, batch)
    del full
    alone = {"target": ("he", 3, "mask"), "detail": ("he", 3, "mask"),
             "ck56_semantic": ("ck56", 3, "mask"), "ck56_edge": ("edge", 2, None)}
    times, unet_peaks = {}, {}
    for name, (key, cin, target) in alone.items():
        unet = VGGUNet(cin, 3 if target else 1, cfg.width, cfg.decoder_width, cfg.norm)
        unet = unet.to(device, memory_format=layout).train()

        def loss_of(m, key=key, target=target):
            logits = m(batch[key])[0]
            if target:
                return F.cross_entropy(logits, batch[target])
            return F.binary_cross_entropy_with_logits(logits[:, 0], batch["edge_target"])

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times[name] = timed(train_step(unet, torch.optim.Adam(unet.parameters()), loss_of,
                                       args.amp, device), args.steps, device)
        unet_peaks[name] = peak_gib(device)
        del unet
    total = sum(times.values())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(json.dumps({"preset": args.preset, "size": cfg.in_size, "device": name, "batch": 2,
                      "amp": args.amp, "channels_last": args.channels_last,
                      "cudnn_benchmark": args.cudnn_benchmark,
                      "compile": args.compile, "compile_s": compile_s,
                      "full_step_s": round(t_full, 4), "unets_alone_s": {k: round(v, 4) for k, v
                                                                          in times.items()},
                      "sum_unets_s": round(total, 4), "overhead": round(t_full / total - 1, 3),
                      "peak_gpu_gib": peak, "peak_gpu_gib_unets_alone": unet_peaks,
                      "sdpa_math_calls": math_calls}))


if __name__ == "__main__":
    main()
