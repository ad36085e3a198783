"""Where the `full` training step's time goes: each variant's step, then each fusion part alone.

Three tables, one JSON line each, the compiled parts one line each (the last line sums up):

- ``variants``: one training step (forward, backward, Adam; batch 2) of ``unet``, ``mrfm``,
  ``mrfm+edm`` and ``full``: the differences price the detail branch with Grad-CAM and MRFM,
  the CK5/6 branch with EDFM, and MSFFM.
- ``parts``: forward and backward of every fusion part alone, on the inputs it received in one
  forward of ``full`` (MRFM, Grad-CAM, each EDFM, the semantic decoder, each MSFFM level and its
  axial attention), against one VGG encoder and decoder for scale.
- ``compiled`` (``--compile``): the same parts under ``torch.compile``, with the compile time.

``--profile FILE`` also writes the profiler's table of the ``full`` step's kernels.

    python bench/fusion_breakdown.py --preset tiny --size 64 --device cpu
    python bench/fusion_breakdown.py --preset paper --device cuda --amp bf16 --channels-last
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable

import torch
from fusion_overhead import (
    CLASSES,
    autocast,
    batch_of,
    laid_out,
    step_options,
    timed,
    train_step,
)

from egcmf_model.config import load_config
from egcmf_model.engine import build_model, forward, pick_device
from egcmf_model.losses import EGCMFLoss

VARIANTS = ("unet", "mrfm", "mrfm+edm", "full")


def tensors_in(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for v in value for t in tensors_in(v)]
    return []


def fresh(value):
    """Detached copies of the captured inputs; float tensors require grad as in training."""
    if isinstance(value, torch.Tensor):
        copy = value.detach().clone()
        return copy.requires_grad_(True) if copy.is_floating_point() else copy
    if isinstance(value, list | tuple):
        return type(value)(fresh(v) for v in value)
    return value


def capture(model, batch, names: list[str]) -> dict[str, tuple]:
    """The positional inputs of the named submodules (and of Grad-CAM) in one forward."""
    seen: dict[str, tuple] = {}
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_pre_hook(
        lambda _m, args, n=n: seen.setdefault(n, fresh(args))) for n in names]
    branch = model.he_branch
    original = branch.saliency

    def saliency(features, stages):
        seen.setdefault("grad_cam", fresh((features, stages)))
        return original(features, stages)

    branch.saliency = saliency
    try:
        forward(model, batch)
    finally:
        for h in hooks:
            h.remove()
        del branch.saliency
    return seen


def part_step(fn, args, amp: str, device: torch.device) -> Callable[[], None]:
    """Forward and backward of ``fn(*args)`` against a fixed random output gradient."""
    with autocast(amp, device):
        outs = tensors_in(fn(*args))
    grads = [torch.randn_like(o, dtype=torch.float32) for o in outs]

    def step() -> None:
        with autocast(amp, device):
            outs = tensors_in(fn(*args))
        loss = sum((o.float() * g).sum() for o, g in zip(outs, grads, strict=True)
                   if o.requires_grad)
        if isinstance(loss, torch.Tensor):
            loss.backward()
    return step


def main() -> None:
    parser = step_options(__doc__.splitlines()[0])
    parser.add_argument("--compile", nargs="*", metavar="PART",
                        help="also time these parts compiled (if none named: Grad-CAM, each EDFM, "
                             "each MSFFM level and its attention)")
    parser.add_argument("--profile", help="write the full step's kernel table to this file")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    base = load_config(args.preset).model
    device = pick_device(args.device)
    size = args.size or base.in_size
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    batch = laid_out(batch_of(size, device), layout)
    mode = {"preset": args.preset, "size": size, "amp": args.amp,
            "channels_last": args.channels_last, "cudnn_benchmark": args.cudnn_benchmark,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    loss_fn = EGCMFLoss(0.5)

    variants = {}
    for variant in VARIANTS:
        cfg = dataclasses.replace(base, in_size=size, variant=variant)
        model = build_model(cfg, CLASSES).to(device, memory_format=layout).train()
        step = train_step(model, torch.optim.Adam(model.parameters()),
                          lambda m: loss_fn(forward(m, batch), batch)[0], args.amp, device)
        variants[variant] = round(timed(step, args.steps, device, warmup=2), 4)
        if variant != "full":
            del model, step
    print(json.dumps({**mode, "variants_s": variants}), flush=True)

    if args.profile:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(3):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        with open(args.profile, "w") as f:
            f.write(json.dumps(mode) + "\n")
            f.write(prof.key_averages().table(sort_by=key, row_limit=60, max_name_column_width=70))
            f.write(prof.key_averages(group_by_input_shape=True).table(
                sort_by=key, row_limit=60, max_name_column_width=70, max_shapes_column_width=90))

    levels = len(model.fusion.levels)
    names = ["he_branch.mrfm", "ck56_branch.sem_decoder", "ck56_branch.edge_net.encoder",
             "ck56_branch.edge_net.decoder",
             *(f"ck56_branch.edfm.{i}" for i in range(levels)),
             *(f"fusion.levels.{i}" for i in range(levels)),
             *(f"fusion.levels.{i}.axial" for i in range(levels))]
    with autocast(args.amp, device):  # the parts see what training feeds them (bf16 or not)
        inputs = capture(model, batch, names)
    modules = dict(model.named_modules())
    saliency = model.he_branch.saliency
    call = {n: modules[n] for n in names} | {"grad_cam": saliency}
    parts = {n: round(timed(part_step(call[n], inputs[n], args.amp, device), args.steps,
                            device, warmup=2), 5)
             for n in ["grad_cam", *names]}
    print(json.dumps({**mode, "parts_s": parts}), flush=True)

    compiled = {}
    if args.compile is not None:
        for n in args.compile or ["grad_cam", *names[4:]]:
            started = time.perf_counter()
            fn = torch.compile(call[n])
            step = part_step(fn, inputs[n], args.amp, device)
            step()
            compile_s = time.perf_counter() - started
            compiled[n] = {"s": round(timed(step, args.steps, device, warmup=2), 5),
                           "compile_s": round(compile_s, 1)}
            print(json.dumps({n: compiled[n]}), flush=True)
    sums = {"edfm": sum(parts[f"ck56_branch.edfm.{i}"] for i in range(levels)),
            "msffm_levels": sum(parts[f"fusion.levels.{i}"] for i in range(levels)),
            "axial": sum(parts[f"fusion.levels.{i}.axial"] for i in range(levels))}
    print(json.dumps({**mode, "variants_s": variants, "parts_sum_s":
                      {k: round(v, 5) for k, v in sums.items()},
                      "compiled_s": {k: v["s"] for k, v in compiled.items()}}))


if __name__ == "__main__":
    main()
