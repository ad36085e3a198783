"""Bitwise-reproducible training on a GPU (``train.deterministic``).

``torch.use_deterministic_algorithms`` picks deterministic kernels where PyTorch has them, but
two operations this network needs have none on CUDA: the backward pass of bilinear upsampling and
the 2-D negative log-likelihood behind cross-entropy (both accumulate with atomic adds). Here
they are written with deterministic primitives (matrix products, ``gather``) and used only when
deterministic algorithms are on and the tensor lives on a GPU; elsewhere the usual kernels run.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F


def enable(deterministic: bool) -> None:
    """Deterministic GPU kernels: cuBLAS workspace, no cuDNN autotuning, the math attention
    kernel, and an error-free mode (``warn_only``) for any op PyTorch cannot make deterministic."""
    if not deterministic:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    # Flash and memory-efficient attention accumulate in a varying order in backward.
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)


def wanted(x: torch.Tensor) -> bool:
    """Whether ``x`` needs the deterministic replacements below."""
    return x.is_cuda and torch.are_deterministic_algorithms_enabled()


def _interpolation_matrix(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    """``(n_out, n_in)`` weights of 1-D linear interpolation, ``align_corners=False``."""
    dst = torch.arange(n_out, dtype=torch.float64)
    src = ((dst + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
    low = src.floor().long().clamp_max(n_in - 1)
    high = (low + 1).clamp_max(n_in - 1)
    frac = src - low
    matrix = torch.zeros(n_out, n_in, dtype=torch.float64)
    matrix[dst.long(), low] += 1 - frac
    matrix[dst.long(), high] += frac
    return matrix.to(device=like.device, dtype=like.dtype)


def bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` as two matrix products,
    whose backward passes are deterministic. ``x`` is ``(B, C, h, w)``."""
    rows = _interpolation_matrix(x.shape[-2], size[0], x)  # (H, h)
    cols = _interpolation_matrix(x.shape[-1], size[1], x)  # (W, w)
    return rows @ x @ cols.T  # (B, C, H, W)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean cross-entropy over non-ignored pixels by ``log_softmax`` and ``gather`` (both
    deterministic on CUDA); ``logits (B, K, H, W)``, ``target (B, H, W)``."""
    valid = target != ignore_index
    picked = F.log_softmax(logits, dim=1).gather(1, target.clamp(0, logits.shape[1] - 1)
                                                 .unsqueeze(1))[:, 0]  # (B, H, W)
    return -(picked * valid).sum() / valid.sum().clamp_min(1)
