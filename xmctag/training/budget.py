"""The time budget: how many epochs of a stage fit ``time_budget_minutes`` (``epochs = "auto"``), measured.

The time of an epoch is projected from a few forward+backward passes on batches of the stage's own kind (no optimiser
step, so the weights are untouched): the median pass after warm-up passes, each timed to the end of its GPU work. (The
first passes on a GPU are several times slower than the rest: one warm-up pass and a plain mean underestimated an
H100's rate several-fold.) An epoch that would not fit is not started: a stage may get 0 epochs.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from xmctag.config import Config
from xmctag.progress import Progress

PROBE_STEPS = 3  # timed forward+backward passes per probe


def probe_warmup(device) -> int:
    """Untimed passes before the timed ones: allocations, kernel selection for new shapes (GPU passes are cheap,
    CPU ones not)."""
    return 3 if device.type == "cuda" else 1


def probe_rate(encoder: torch.nn.Module, batches: list[np.ndarray], device, loss_of) -> float:
    """Items per second of forward+backward passes ``loss_of(batch).backward()`` over ``batches`` (no optimiser
    step: the weights are untouched): the median pass after the first ``probe_warmup`` ones, each timed to the end
    of its GPU work."""
    warmup = probe_warmup(device)
    encoder.train()
    rates = []
    for step, batch in enumerate(batches):
        started = time.perf_counter()
        loss_of(batch).backward()
        encoder.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            rates.append(len(batch) / max(time.perf_counter() - started, 1e-9))
    return float(np.median(rates)) if rates else float("inf")


def epochs_that_fit(config: Config, epoch_minutes: float, budget: float) -> int:
    """Whole epochs of ``epoch_minutes`` within ``budget`` minutes, at most ``auto_max_epochs`` (all of them when
    ``time_budget_minutes`` is 0, no limit)."""
    if config.time_budget_minutes <= 0:
        return config.auto_max_epochs
    return min(config.auto_max_epochs, int(max(budget, 0.0) // epoch_minutes))


def plan_epochs(config: Config, rate: float, items: int, budget: float, show: Progress, name: str, unit: str) -> int:
    """Epochs of ``items`` at ``rate`` items/s within ``budget`` minutes (``epochs_that_fit``), logged."""
    epoch_minutes = items / rate / 60
    epochs = epochs_that_fit(config, epoch_minutes, budget)
    show.log(f"{name} auto: ~{rate:.0f} {unit}/s, ~{epoch_minutes:.1f} min per epoch, budget {max(budget, 0.0):.1f} "
             f"min -> {epochs} epoch(s)")
    return epochs
