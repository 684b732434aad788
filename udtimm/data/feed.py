"""Batches from a loader to the model: moved to the device and finished there, prepared ahead of the step.

On a GPU a thread of its own prepares the next batches on a side stream while the main thread launches the
step: the copy to the GPU, the normalisation, nvJPEG's decode and the augmentations of --gpu-decode overlap the
step instead of adding to it (docs/throughput.md). The main thread's stream waits for a batch's event before it
uses the batch, so nothing reads a batch before it is ready, and nothing here waits for the step.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext

import torch
from accelerate.utils import send_to_device
from torch import Tensor

from .gpu import PartialBatch

# Turns a loader's image field (uint8 batches, or --gpu-decode's encoded files) into the model's input on the device.
BatchTransform = Callable[[object], Tensor | PartialBatch]

_END = object()
_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per GPU for the whole run: the caching allocator keeps freed memory per stream, so a new
    stream per epoch would strand each old one's cached batches."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def tensors_of(value: object) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_of(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_of(item)


class DeviceFeeder:
    """A loader's batches (image, target, difficult, index[, unreadable]) with every tensor on `device` and the
    images made model input by `transform`, prepared `ahead` batches before the step that uses them.

    ahead=0 prepares each batch when it is asked for (the default off CUDA, where a thread would only compete with
    the step for the same cores). The loader itself is left as it is: its length, generator and sharding.
    """

    def __init__(self, loader: Iterable, transform: BatchTransform | None, device: torch.device,
                 ahead: int | None = None) -> None:
        self.loader, self.transform, self.device = loader, transform, torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # accelerate's single-GPU device is "cuda"
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.ahead = (2 if self.device.type == "cuda" else 0) if ahead is None else ahead

    def __len__(self) -> int:
        return len(self.loader)

    def prepare(self, batch: tuple | list) -> tuple:
        # send_to_device copies from pinned memory without the host waiting, and leaves an EncodedBatch (no .to) and
        # --skip-corrupt's messages where they are.
        images, *rest = send_to_device(tuple(batch), self.device, non_blocking=True)
        if self.transform is None or len(rest[0]) == 0:  # --skip-corrupt: no readable image; the loop passes it over
            return (images, *rest)
        images = self.transform(images)
        if not isinstance(images, PartialBatch):
            return (images, *rest)
        # --skip-corrupt's batches carry a fifth field, the messages of the images left out: these join them.
        target, difficult, indices, messages = rest
        kept = torch.tensor(images.kept, dtype=torch.int64).to(target.device)
        return (images.images, target[kept], difficult[kept], indices[kept], [*messages, *images.messages])

    def __iter__(self) -> Iterator[tuple]:
        if self.ahead == 0:
            for batch in self.loader:
                yield self.prepare(batch)
            return
        yield from self._prepared_ahead()

    def _prepared_ahead(self) -> Iterator[tuple]:
        ready: queue.Queue = queue.Queue(maxsize=self.ahead)
        stop = threading.Event()
        stream = side_stream(self.device) if self.device.type == "cuda" else None
        batches = iter(self.loader)

        def hand_over(item: object) -> bool:
            """Queue `item` unless the consumer has stopped; False once it has."""
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                if stream is not None:
                    torch.cuda.set_device(self.device)  # a new thread starts on GPU 0, whatever the process uses
                with torch.cuda.stream(stream) if stream is not None else nullcontext():
                    for batch in batches:
                        prepared = self.prepare(batch)
                        event = stream.record_event() if stream is not None else None
                        if not hand_over((prepared, event)):
                            return
                hand_over(_END)
            except BaseException as err:  # re-raised by the consumer, with the worker's or decoder's message
                hand_over(err)

        thread = threading.Thread(target=produce, name="udtimm-feeder", daemon=True)
        thread.start()
        try:
            while (item := ready.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                prepared, event = item
                if event is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    for tensor in tensors_of(prepared):
                        if tensor.device.type == "cuda":
                            tensor.record_stream(current)  # freed later by this stream, not the side stream
                yield prepared
        finally:
            stop.set()
            thread.join()
