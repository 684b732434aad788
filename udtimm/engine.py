"""One training epoch and one evaluation pass, shared by train.py, distill.py and validate.py (accelerate-aware)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast
from timm.utils import ModelEmaV3
from torch import Tensor, nn
from tqdm import tqdm

from udtimm.data.loader import report_unreadable
from udtimm.errors import NonFiniteLossError
from udtimm.metric_statistics import MetricStatistics
from udtimm.mixing import Mixer
from udtimm.objectives import Objective
from udtimm.predictions import Predictions
from udtimm.settings import OptimSettings, RuntimeSettings


def bare_model(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """The model without its DDP / torch.compile wrappers, whose state_dict keys are the checkpoint's."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def progress(iterable: Iterable, accelerator: Accelerator, description: str, enabled: bool = True) -> Iterable:
    return tqdm(iterable, desc=description, leave=False, dynamic_ncols=True,
                disable=not (enabled and accelerator.is_main_process))


class LossReadout:
    """A step's loss terms, copied to the host by the step's own stream without the host waiting for them.

    Reading them waits for that step only, not for those launched since: the training loop reads a step's terms
    after launching the next one, so the host stays a step ahead of the GPU instead of waiting for it every step.
    """

    def __init__(self, step: int, terms: dict[str, Tensor], accelerator: Accelerator) -> None:
        values = torch.stack([value.detach().float() for value in terms.values()])
        finite = torch.isfinite(values).float()
        if accelerator.num_processes > 1:  # all processes agree on a bad step, so they skip or stop together
            finite = accelerator.reduce(finite, reduction="sum")
        self.step, self.names, self.processes = step, tuple(terms), accelerator.num_processes
        self.host = torch.cat([values, finite]).to("cpu", non_blocking=True)
        self.copied = torch.cuda.Event() if values.is_cuda else None
        if self.copied is not None:
            self.copied.record()

    def values(self) -> dict[str, float]:
        if self.copied is not None:
            self.copied.synchronize()
        return dict(zip(self.names, self.host[:len(self.names)].tolist(), strict=True))

    def first_nonfinite(self) -> str | None:
        """The name of the first term that is NaN/inf on any process, or None."""
        values = self.values()
        finite = self.host[len(self.names):].tolist()
        return next((name for name, count in zip(values, finite, strict=True) if count < self.processes), None)


def smallest_batch(size: int, accelerator: Accelerator) -> int:
    """The smallest batch of all processes: --skip-corrupt shrinks batches unevenly, and a step skipped on one
    process must be skipped on all or DDP waits forever."""
    if accelerator.num_processes == 1:
        return size
    return int(accelerator.gather(torch.tensor([size], device=accelerator.device)).min())


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: object,
    accelerator: Accelerator,
    objective: Objective,
    epoch: int,
    num_updates: int,
    optim: OptimSettings,
    runtime: RuntimeSettings,
    ema: ModelEmaV3 | None = None,
    mixer: Mixer | None = None,
) -> dict[str, float]:
    """Train for one epoch; returns the mean of each loss term, the skipped-step and -image counts and images/s.

    `loader` yields batches ready for the model (udtimm.data.feed.DeviceFeeder). A NaN/inf loss term stops the
    epoch with NonFiniteLossError naming its step; with --skip-nonfinite that step is skipped instead (its batch
    adds nothing; when it ends a --grad-accum-steps group, the group makes no update). --clip-grad clips the
    gradient norm of each update. With `ema`, the EMA weights follow every optimizer step. With `mixer` (--mixup,
    --cutmix), each batch is mixed on its device before the objective, which gets the mixed images and the Mix to
    mix the labels with.
    """
    model.train()
    sums: dict[str, Tensor] = {}
    steps = skipped = images_seen = unreadable = 0
    previous: LossReadout | None = None
    start = time.perf_counter()
    bar = progress(loader, accelerator, f"train {epoch}", not runtime.no_progress)
    accumulation, batches = accelerator.gradient_accumulation_steps, len(loader)
    for step, batch in enumerate(bar):
        images, target, difficult = batch[:3]
        if len(batch) > 4:  # --skip-corrupt: the fifth field lists the images the loader left out
            unreadable += report_unreadable(batch[4])
            # BatchNorm cannot train on one sample; such a rare leftover batch is passed over.
            if smallest_batch(len(target), accelerator) < 2:
                continue
        mix = mixer.draw(epoch, step, images.shape[-2:]) if mixer is not None else None
        if mix is not None:  # distill.py's teacher sees these mixed images too
            images = mix.images(images)
        group_end = (step + 1) % accumulation == 0 or step + 1 == batches
        with accumulation_step(accelerator, model, group_end):
            terms = objective(model, images, target, difficult, mix)
            readout = LossReadout(step, terms, accelerator)
            # Known before the update: this waits for the step.
            if runtime.skip_nonfinite and readout.first_nonfinite() is not None:
                skipped += 1
                optimizer.zero_grad(set_to_none=True)  # inside a group a no-op: the group's other batches stay
                continue
            accelerator.backward(terms["loss"] * accumulation_scale(step, batches, accumulation))
            if optim.clip_grad is not None and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), optim.clip_grad)
            optimizer.step()  # accelerate's optimizer steps and zeroes only at a group's end
            optimizer.zero_grad(set_to_none=True)
        if group_end:
            num_updates += 1
            scheduler.step_update(num_updates=num_updates)
            if ema is not None:
                ema.update(bare_model(accelerator, model), step=num_updates)
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float()
        steps += 1
        images_seen += len(target)
        if previous is not None:  # this step is launched: checking the one before it does not idle the GPU
            check_finite(previous, epoch)
            if steps % 10 == 0 and hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{previous.values()['loss']:.4f}")
        previous = readout
    if previous is not None:
        check_finite(previous, epoch)
    scheduler.step(epoch + 1)
    means = {name: accelerator.reduce(total, reduction="mean").item() / max(steps, 1) for name, total in sums.items()}
    elapsed = time.perf_counter() - start
    means.update(
        skipped_steps=skipped,
        skipped_images=int(accelerator.reduce(torch.tensor(unreadable, device=accelerator.device), "sum").item()),
        images_per_s=images_seen * accelerator.num_processes / elapsed if elapsed > 0 else math.nan,
    )
    return means


def optimizer_steps(batches: int, accumulation: int) -> int:
    """Optimizer steps of an epoch of `batches` with --grad-accum-steps `accumulation` (a shorter last group too)."""
    return math.ceil(batches / accumulation)


def accumulation_step(accelerator: Accelerator, model: nn.Module, group_end: bool) -> AbstractContextManager:
    """One batch of a --grad-accum-steps group: what `accelerator.accumulate(model)` does, the group's end given.

    accumulate() finds an epoch's last batch through the loader, which DeviceFeeder's thread runs ahead of the
    steps on a GPU: it would close the epoch's last group too early, or carry it into the next epoch. Here every
    epoch starts a group and ends one, as in timm's train.py. Gradients are all-reduced at a group's end only,
    and accelerate's optimizer steps (and zeroes) only there.
    """
    accelerator.sync_gradients = group_end
    return nullcontext() if group_end else accelerator.no_sync(model)


def accumulation_scale(step: int, batches: int, accumulation: int) -> float:
    """The factor that makes a group's gradient the mean over its batches: accelerator.backward divides every loss
    by --grad-accum-steps, but an epoch's last group may be shorter."""
    last_group_start = batches - batches % accumulation
    return 1.0 if step < last_group_start else accumulation / (batches - last_group_start)


def broadcast_buffers(module: nn.Module, accelerator: Accelerator) -> None:
    """Every process gets the main process's buffers of `module`: each process's BatchNorm statistics follow its own
    batches (DDP copies the main process's only at the next training step, an EMA averages each process's own), and
    the checkpoints are written from the main process."""
    if accelerator.num_processes > 1:
        for buffer in module.buffers():
            buffer.copy_(broadcast(buffer.clone(), from_process=0))


def check_finite(readout: LossReadout, epoch: int) -> None:
    bad_term = readout.first_nonfinite()
    if bad_term is not None:
        raise NonFiniteLossError(
            f"non-finite loss at epoch {epoch}, step {readout.step}: term {bad_term!r} = "
            f"{readout.values()[bad_term]} (use --skip-nonfinite to skip such steps)"
        )


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, accelerator: Accelerator, show_progress: bool = True) -> Predictions:
    """Classification-branch probabilities (and logits) for every image of the loader, gathered across processes.

    Each image is kept once, in dataset order (so tied scores rank, and files list, the same way whatever the
    number of processes or the loader's order): the samples a distributed sampler repeats to even out the last
    batch are recognised by their index, so N processes return exactly the images (and numbers) of one. A single
    padded gather at the end lets processes hold different numbers of images (--skip-corrupt leaves some out).
    """
    model.eval()
    parts: list[tuple[Tensor, ...]] = []
    for batch in progress(loader, accelerator, "eval", show_progress):
        images, target, difficult, indices = batch[:4]
        if len(batch) > 4:  # --skip-corrupt: the fifth field lists the images the loader left out
            report_unreadable(batch[4])
            if len(target) == 0:
                continue
        logits = classification_logits(model, images, accelerator)
        # Results stay on the device until the end: a copy to the host per batch would make the host wait for
        # the GPU, which would then sit idle while the next batch is decoded.
        parts.append((logits, target.float(), difficult.float(), indices))
    if not parts:
        raise ValueError("the evaluation loader yielded no images")
    local = tuple(torch.cat(column) for column in zip(*parts, strict=True))
    gathered = accelerator.gather(accelerator.pad_across_processes(local, dim=0, pad_index=-1))
    logits, target, difficult, indices = (column.cpu() for column in gathered)
    order = torch.argsort(indices, stable=True)
    keep = order[first_sightings(indices, indices[:0])[order]]  # dataset order; padding has index -1
    return Predictions(torch.sigmoid(logits[keep]), target[keep], difficult[keep].bool(), indices[keep], logits[keep])


def classification_logits(model: nn.Module, images: Tensor, accelerator: Accelerator) -> Tensor:
    """The classification branch's float32 logits of a batch."""
    with accelerator.autocast():
        output = model(images)
    # udtimm's CalibratedModel returns a ModelOutput; a plain timm classifier (Predictor.model) its logits.
    return (output if isinstance(output, Tensor) else output.logits).float()


def first_sightings(gathered: Tensor, seen: Tensor) -> Tensor:
    """Bool, like `gathered` (a step's image indices of every process, in process order, -1 for padding): the
    indices neither in `seen` (the earlier steps') nor earlier in `gathered` (the image counts where it came first)."""
    order = torch.argsort(gathered, stable=True)
    ordered = gathered[order]
    first = torch.ones_like(gathered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    new = torch.empty_like(first).scatter_(0, order, first)
    return new & (gathered >= 0) & ~torch.isin(gathered, seen)


@torch.no_grad()
def evaluate_streaming(model: nn.Module, loader: Iterable, accelerator: Accelerator, statistics: MetricStatistics,
                       show_progress: bool = True, difficult_subset_only: bool = False) -> MetricStatistics:
    """`statistics` with every image of the loader added, summed over processes (--eval-memory binned): each
    batch's probabilities are added where they are computed, and nothing of size images x classes is kept.

    Each image counts once, as in predict: every step gathers the image indices of all processes (8 bytes an
    image), and an image already counted, at an earlier step or on a process before in this one, is left out,
    so N processes give the numbers of one. That gather makes the host wait for the step before it; predict's
    single gather at the end does not. With `difficult_subset_only` (--subset difficult) only the images with a
    difficult label count.
    """
    model.eval()
    seen = torch.empty(0, dtype=torch.int64, device=accelerator.device)
    evaluated = False
    for batch in progress(loader, accelerator, "eval", show_progress):
        images, target, difficult, indices = batch[:4]
        if len(batch) > 4:  # --skip-corrupt: the fifth field lists the images the loader left out
            report_unreadable(batch[4])
        # An empty batch (--skip-corrupt) is float; every process must gather its part all the same.
        indices = indices.to(accelerator.device, torch.int64)
        gathered = indices
        if accelerator.num_processes > 1:
            gathered = accelerator.gather(accelerator.pad_across_processes(indices, dim=0, pad_index=-1))
        first = first_sightings(gathered, seen)
        seen = torch.cat([seen, gathered])
        if len(target) == 0:
            continue
        start = accelerator.process_index * (len(gathered) // accelerator.num_processes)
        counted = first[start:start + len(indices)]
        if difficult_subset_only:
            counted = counted & difficult.bool().any(1)
        scores = torch.sigmoid(classification_logits(model, images, accelerator))
        statistics.update(scores, target, difficult.bool(), counted)
        evaluated = True
    if not evaluated:
        raise ValueError("the evaluation loader yielded no images")
    if accelerator.num_processes > 1:
        statistics = statistics.with_sums(accelerator.reduce(statistics.sums, reduction="sum"))
    return statistics
