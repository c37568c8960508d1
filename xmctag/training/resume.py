"""What ``--resume`` continues from: the run's checkpoint checked against the stages that wrote it, and a stage's
saved state loaded into its model and optimiser, with a ``UserError`` naming the run when either does not fit."""

from __future__ import annotations

from pathlib import Path

import torch

from xmctag import run_dir
from xmctag.training.stage import StageProgress


def read_checkpoint(out: Path, stage_types: tuple) -> dict | None:
    """The checkpoint ``--resume`` goes on from (``run_dir.load_checkpoint``: the torch RNG restored), None when
    there is none; one that is not what a stage of this version saved is a ``UserError``. ``stage_types``: the
    stage classes in training order, (dual encoder, classifier): a classifier checkpoint also holds the dual-encoder
    stage's progress."""
    checkpoint = run_dir.load_checkpoint(out)
    if checkpoint is None:
        return None
    with run_dir.checkpoint_errors(out):
        stages = {stage.name: stage for stage in stage_types}
        stage = stages.get(checkpoint["stage"])
        if stage is None:
            raise ValueError(f"unknown stage {checkpoint['stage']!r}")
        for name in ("dual_encoder", "classifier") if stage is stage_types[-1] else ("dual_encoder",):
            StageProgress.from_dict(checkpoint[name])
        for key, kind in stage.state_types.items():
            value = checkpoint["state"].get(key) if _optional(kind) else checkpoint["state"][key]
            if not isinstance(value, kind):
                raise TypeError(f"state {key!r} is a {type(value).__name__}")
    return checkpoint


def _optional(kind) -> bool:
    """Whether a state entry of type ``kind`` may be None, and so may be missing from an older checkpoint."""
    return isinstance(kind, tuple) and type(None) in kind


def load_state(out: Path, stage, state: dict) -> None:
    """``stage.load_state(state)``; a state that does not fit the stage's model and optimiser is a ``UserError``."""
    with run_dir.checkpoint_errors(out):
        stage.load_state(state)
        for group in stage.optimizer.param_groups:  # load_state_dict does not compare the moments' shapes
            for param in group["params"]:
                for key, value in stage.optimizer.state.get(param, {}).items():
                    if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                        raise ValueError(f"optimizer {key} of shape {tuple(value.shape)} for a parameter of shape "
                                         f"{tuple(param.shape)}")
