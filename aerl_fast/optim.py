"""The optimizer and its learning-rate schedule (per optimizer step, as the study's SL recipe)."""
from __future__ import annotations

import math

import torch

SCHEDULES = ("constant", "warmup-linear", "cosine")  # --schedule


def lr_factor(cfg, step: int, steps_per_epoch: int) -> float:
    """Multiplier of --lr at global optimizer step `step` (0-based) for a TrainConfig `cfg`.

    warmup-linear: (step+1)/warm during the warm-up, then linear from 1 down to final_lr_frac at the
    last step; cosine: the same warm-up, then half a cosine from 1 to final_lr_frac; constant: 1."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    if cfg.schedule != "constant" and step < warm:
        return (step + 1) / warm
    if cfg.schedule == "warmup-linear":
        frac = (step - warm) / max(1, total - warm)
        return 1.0 - (1.0 - cfg.final_lr_frac) * min(1.0, frac)
    if cfg.schedule == "cosine":
        frac = min(1.0, (step - warm) / max(1, total - warm))
        return cfg.final_lr_frac + (1.0 - cfg.final_lr_frac) * 0.5 * (1.0 + math.cos(math.pi * frac))
    return 1.0


def fused_adamw_supported(device: torch.device) -> bool:
    return device.type in ("cuda", "cpu") and "fused" in torch.optim.AdamW.__init__.__code__.co_varnames


def build_optimizer(model: torch.nn.Module, cfg, device: torch.device, steps_per_epoch: int):
    """(AdamW, LambdaLR) for a TrainConfig: fused AdamW where torch has it, the schedule per step."""
    fused = fused_adamw_supported(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            **({"fused": True} if fused else {}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s, steps_per_epoch))
    return opt, sched
