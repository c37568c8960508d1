"""Reading and writing ONNX files, and the logger noise of the ONNX tools."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

OPSET = 17
EXTERNAL_DATA_BYTES = 1 << 30  # larger graphs keep their weights in "<name>.data" (protobuf's limit is 2 GiB)


def load_onnx(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=True)


def save_onnx(model, path: Path, limit: int = EXTERNAL_DATA_BYTES, location: str | None = None) -> None:
    """One self-contained file, or the graph plus ``location`` (default ``<name>.data``) when over ``limit`` bytes."""
    import onnx

    large = model.ByteSize() > limit
    onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=location or path.name + ".data")


@contextlib.contextmanager
def quiet_loggers(*names: str):
    """Only CRITICAL records from the loggers ``names`` ("" = root) while the block runs."""
    loggers = [logging.getLogger(name or None) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
