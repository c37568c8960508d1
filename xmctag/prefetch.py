"""``prefetch(items, depth)``: iterate a generator in a background thread, up to ``depth`` items ahead.

Used by tagging to run the image work (cache lookups, decoding, the vision graph) of the next batch while the text
encoder runs on this one: ONNX Runtime and PIL release the GIL, so the two overlap.
"""

from __future__ import annotations

import queue
import threading


def prefetch(items, depth: int = 2, name: str = "xmctag-prefetch"):
    """Iterates ``items`` in a background thread, up to ``depth`` items ahead; its exceptions are re-raised here.

    Stopping early (an error downstream) tells the producer to stop at its next item.
    """
    done = object()
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not put((None, item)):
                    return
            put((None, done))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put((e, None))

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            error, item = buffer.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
