"""What the two fine-tuning stages share: the epoch loop with dev evaluation, the best-epoch rule, checkpoints.

A stage (``DualEncoderStage``, ``ClassifierStage``) trains the encoder for ``epochs`` epochs and implements:

- ``train_epoch(epoch, show) -> record``: one pass over the training products; the record (a ``history`` entry of
  ``metrics.json``) holds the epoch number under ``epoch_key``, ``loss`` and ``seconds``;
- ``dev_vectors() -> LabelVectors``: what a dev evaluation after the epoch scores products against;
- ``keep()``: save what the stage has now as its best (``run_epochs`` calls it when an epoch is the best so far);
- ``state()`` / ``load_state(state)``: its weights and optimiser, for ``--resume`` (a checkpoint:
  ``xmctag.training.checkpoint``), and ``state_types``, the type of each entry of ``state()``, which a checkpoint
  is checked against before it is loaded (``load_state`` checks the shapes);
- ``progress``: a ``StageProgress``, its bookkeeping (epochs planned and done, history, best epoch), which
  checkpoints carry as JSON-able data (``to_dict`` / ``from_dict``).

``run_epochs`` drives it: after each epoch a dev evaluation (when there is a dev set), the best-epoch rule
(``BestEpoch``: stated once, here), a checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

from xmctag.progress import Progress


def dev_score(metrics: dict[str, float]) -> float:
    """What picks the best epoch of either stage on dev."""
    return metrics["P@1"] + metrics["P@5"]


def short(metrics: dict[str, float]) -> str:
    """A metrics dict as one log line: P@1, P@5, nDCG@5, PSP@5, R@5 in percent."""
    keys = [k for k in ("P@1", "P@5", "nDCG@5", "PSP@5", "R@5") if k in metrics]
    return " ".join(f"{k} {100 * metrics[k]:.2f}" for k in keys)


@dataclass
class BestEpoch:
    """The epoch a stage keeps: the best dev score so far. Ties keep the later epoch (it trained longer); without a
    dev set the score is the epoch number, so the last epoch is kept. ``epoch`` 0: none yet."""

    score: float = -1.0
    epoch: int = 0

    def update(self, score: float, epoch: int) -> bool:
        """Records epoch ``epoch`` (1-based) with ``score``; True when it is the best so far."""
        if score < self.score:
            return False
        self.score, self.epoch = score, epoch
        return True


@dataclass
class StageProgress:
    """A stage's bookkeeping: epochs planned and done, their history records, the best epoch (JSON-able)."""

    epochs: int = 0
    done: int = 0
    history: list[dict] = field(default_factory=list)
    best: BestEpoch = field(default_factory=BestEpoch)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "StageProgress":
        return cls(values["epochs"], values["done"], list(values["history"]), BestEpoch(**values["best"]))


def run_epochs(stage, evaluate: Callable | None, checkpoint: Callable[[], None], show: Progress) -> None:
    """Runs ``stage``'s epochs ``progress.done + 1 .. progress.epochs``: train, evaluate on dev
    (``evaluate(stage)`` -> metrics; None: no dev set), keep the best (``stage.keep()``), checkpoint."""
    progress = stage.progress
    for epoch in range(progress.done, progress.epochs):
        record = stage.train_epoch(epoch, show)
        line = f"{stage.label} {epoch + 1}: loss {record['loss']:.4f}"
        if evaluate is not None:
            record[stage.dev_key] = evaluate(stage)
            score = dev_score(record[stage.dev_key])
            line += ", dev " + short(record[stage.dev_key])
        else:
            score = epoch + 1
        show.log(line)
        progress.history.append(record)
        progress.done = epoch + 1
        if progress.best.update(score, epoch + 1):
            stage.keep()
        checkpoint()
