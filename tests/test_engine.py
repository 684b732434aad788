import math

import pytest
import torch
from accelerate import Accelerator
from timm.scheduler import create_scheduler_v2

import train
from udtimm import config, engine
from udtimm.engine import (
    LossReadout,
    accumulation_scale,
    bare_model,
    optimizer_steps,
    train_one_epoch,
)
from udtimm.errors import NonFiniteLossError
from udtimm.metric_statistics import MetricStatistics
from udtimm.metrics import compute_metrics
from udtimm.model import create_model
from udtimm.objectives import SupervisedObjective
from udtimm.settings import ModelSettings, TrainingSettings


@pytest.mark.slow
def test_bare_model_strips_torch_compile_so_checkpoint_keys_stay_plain() -> None:
    model = create_model(ModelSettings("test_resnet"), 3, cal=True)
    compiled = torch.compile(model)  # lazy: nothing is compiled until it is called
    assert any(key.startswith("_orig_mod.") for key in compiled.state_dict())
    bare = bare_model(Accelerator(cpu=True), compiled)
    assert bare is model and not any(key.startswith("_orig_mod.") for key in bare.state_dict())


def test_loss_readout_names_the_first_nonfinite_term() -> None:
    accelerator = Accelerator(cpu=True)
    terms = {"bce": torch.tensor(0.5), "partial_softmax": torch.tensor(float("nan")), "loss": torch.tensor(math.inf)}
    readout = LossReadout(3, terms, accelerator)
    assert readout.first_nonfinite() == "partial_softmax"
    assert readout.values()["bce"] == 0.5 and math.isinf(readout.values()["loss"])
    assert LossReadout(0, {"loss": torch.tensor(1.0)}, accelerator).first_nonfinite() is None


class CountingObjective:
    """BCE of a tiny model; NaN at the steps in `nan_steps`; counts its calls (steps launched)."""

    def __init__(self, nan_steps: set[int]) -> None:
        self.calls, self.nan_steps = 0, nan_steps

    def __call__(self, model, images, target, difficult, mix=None) -> dict[str, torch.Tensor]:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(images).logits, target)
        loss = loss * math.nan if self.calls in self.nan_steps else loss
        self.calls += 1
        return {"bce": loss, "loss": loss}


def run_settings(*flags: str) -> TrainingSettings:
    """train.py's settings for `flags` (its defaults otherwise), without a progress bar."""
    return config.training_settings(train.parse_args(["--no-progress", *flags]))


def run_epoch(objective: CountingObjective, steps: int = 5, skip_nonfinite: bool = False) -> dict[str, float]:
    torch.manual_seed(0)
    model = create_model(ModelSettings("test_resnet"), 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=1, step_on_epochs=False,
                                       updates_per_epoch=steps, warmup_epochs=0)
    batches = [(torch.randn(4, 3, 32, 32), torch.ones(4, 3), torch.zeros(4, 3, dtype=torch.bool), torch.arange(4))
               for _ in range(steps)]
    settings = run_settings(*["--skip-nonfinite"] * skip_nonfinite)
    return train_one_epoch(model, batches, optimizer, scheduler, Accelerator(cpu=True), objective, epoch=2,
                           num_updates=0, optim=settings.optim, runtime=settings.runtime)


def test_a_step_is_checked_only_after_the_next_one_is_launched(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host reads step s's losses once step s+1 is queued, so it never waits for the step it just launched."""
    objective, checked = CountingObjective(set()), []
    real = engine.check_finite

    def check(readout: LossReadout, epoch: int) -> None:
        checked.append((readout.step, objective.calls))
        real(readout, epoch)

    monkeypatch.setattr(engine, "check_finite", check)
    run_epoch(objective)
    assert checked == [(0, 2), (1, 3), (2, 4), (3, 5), (4, 5)]  # the last step once the epoch's loop is done


@pytest.mark.parametrize("nan_step", [1, 4])
def test_a_nan_step_stops_the_epoch_naming_that_step(nan_step: int) -> None:
    with pytest.raises(NonFiniteLossError, match=f"epoch 2, step {nan_step}: term 'bce' = nan"):
        run_epoch(CountingObjective({nan_step}))


def test_skip_nonfinite_skips_the_nan_step_before_its_update() -> None:
    stats = run_epoch(CountingObjective({1, 4}), skip_nonfinite=True)
    assert stats["skipped_steps"] == 2 and math.isfinite(stats["loss"])


def test_clip_grad_reaches_the_loop_from_the_settings() -> None:
    """--clip-grad (OptimSettings): one SGD step of learning rate 1 moves the weights by at most the clip norm."""
    moved = {}
    for flags in ((), ("--clip-grad", "0.01")):
        torch.manual_seed(0)
        model = create_model(ModelSettings("test_resnet"), 3)
        before = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=1, step_on_epochs=False,
                                           updates_per_epoch=1, warmup_epochs=0)
        batch = (torch.randn(4, 3, 32, 32), torch.ones(4, 3), torch.zeros(4, 3, dtype=torch.bool), torch.arange(4))
        settings = run_settings(*flags)
        train_one_epoch(model, [batch], optimizer, scheduler, Accelerator(cpu=True), SupervisedObjective("bce"),
                        epoch=0, num_updates=0, optim=settings.optim, runtime=settings.runtime)
        moved[flags] = float((torch.nn.utils.parameters_to_vector(model.parameters()).detach() - before).norm())
    assert moved[()] > 0.1 and moved[("--clip-grad", "0.01")] == pytest.approx(0.01, rel=1e-3)


def test_an_epoch_counts_its_optimizer_steps_with_a_shorter_last_group() -> None:
    assert [optimizer_steps(batches, 4) for batches in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]
    assert [accumulation_scale(step, 5, 2) for step in range(5)] == [1.0, 1.0, 1.0, 1.0, 2.0]  # 2 + 2 + 1
    assert [accumulation_scale(step, 6, 3) for step in range(6)] == [1.0] * 6


def without_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], torch.nn.Identity())
    return model


def weights_after_an_epoch(batch_sizes: list[int], accumulation: int, cal: bool) -> dict[str, torch.Tensor]:
    """The same 24 (or 16) images, cut into batches of `batch_sizes`, trained with --grad-accum-steps."""
    torch.manual_seed(0)
    model = without_batchnorm(create_model(ModelSettings("test_resnet"), 4, cal=cal))
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(sum(batch_sizes), 3, 32, 32, generator=generator)
    target = (torch.rand(len(images), 4, generator=generator) > 0.5).float()
    target[:, 0] = 1.0  # every image has a positive: the partial-softmax mean over images has no empty sample
    batches, start = [], 0
    for size in batch_sizes:
        part = slice(start, start + size)
        batches.append((images[part], target[part], torch.zeros(size, 4, dtype=torch.bool), torch.arange(size)))
        start += size
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    updates = optimizer_steps(len(batches), accumulation)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=1, step_on_epochs=False,
                                       updates_per_epoch=updates, warmup_epochs=0)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    model, optimizer = accelerator.prepare(model, optimizer)  # accelerate's optimizer steps at a group's end only
    settings = run_settings()
    train_one_epoch(model, batches, optimizer, scheduler, accelerator, SupervisedObjective("bce"), epoch=0,
                    num_updates=0, optim=settings.optim, runtime=settings.runtime)
    return {key: value.clone() for key, value in model.state_dict().items()}


@pytest.mark.parametrize("cal", [False, True], ids=["bce", "cal"])
def test_two_accumulated_batches_of_8_equal_one_batch_of_16(cal: bool) -> None:
    """Weights after one optimizer step: 2 x 8 accumulated against 1 x 16, BCE alone and Eq. 12 (BCE + lambda PAL-N).

    BatchNorm would normalise each batch of 8 with its own statistics, and so change the forward pass itself: the
    model here has none (its BatchNorm layers are identities), so what is compared is the gradient accumulation
    alone, which must give the mean gradient over the 16 images.
    """
    one_batch = weights_after_an_epoch([16], 1, cal)
    accumulated = weights_after_an_epoch([8, 8], 2, cal)
    torch.manual_seed(0)
    initial = without_batchnorm(create_model(ModelSettings("test_resnet"), 4, cal=cal)).state_dict()
    assert any(not torch.equal(one_batch[key], initial[key]) for key in initial)  # a real step
    for key in one_batch:
        torch.testing.assert_close(accumulated[key], one_batch[key], rtol=1e-5, atol=1e-6, msg=key)


def test_an_epochs_shorter_last_group_averages_its_own_batches() -> None:
    """3 batches of 8 with 2 accumulation steps: two updates, 16 images then 8, as batches of 16 and 8 give."""
    expected = weights_after_an_epoch([16, 8], 1, cal=False)
    got = weights_after_an_epoch([8, 8, 8], 2, cal=False)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_predict_returns_each_image_once_in_dataset_order() -> None:
    """A loader in another order, repeating an image (as a distributed sampler evens out its last batch)."""
    torch.manual_seed(0)
    model = create_model(ModelSettings("test_resnet"), 3).eval()
    images, target = torch.randn(6, 3, 32, 32), (torch.rand(6, 3) > 0.5).float()
    order = [[4, 1, 5], [0, 3, 2], [4]]
    loader = [(images[i], target[i], torch.zeros(len(i), 3, dtype=torch.bool), torch.tensor(i)) for i in order]
    predictions = engine.predict(model, loader, Accelerator(cpu=True), show_progress=False)
    assert predictions.indices.tolist() == list(range(6)) and torch.equal(predictions.target, target)
    with torch.no_grad():
        expected = torch.sigmoid(model(images).logits)
    torch.testing.assert_close(predictions.scores, expected)  # float32, batches of other sizes: its tolerance


def test_first_sightings_keep_each_image_where_it_comes_first() -> None:
    # Two processes' indices of a step, the second padded with -1; 3 and 7 were counted at an earlier step.
    gathered = torch.tensor([5, 3, 9, 5, 0, 9, 7, -1])
    assert engine.first_sightings(gathered, torch.tensor([3, 7])).tolist() == \
        [True, False, True, False, True, False, False, False]
    assert engine.first_sightings(torch.tensor([2, 1, 2]), torch.tensor([], dtype=torch.int64)).tolist() == \
        [True, True, False]


def test_streaming_evaluation_counts_each_image_once_and_gives_the_exact_metrics() -> None:
    """The loader of test_predict_returns_each_image_once_in_dataset_order, plus an empty batch (--skip-corrupt):
    the statistics' metrics are compute_metrics' of predict's output, AP within the binned tolerance."""
    torch.manual_seed(0)
    model = create_model(ModelSettings("test_resnet"), 3).eval()
    images, target = torch.randn(6, 3, 32, 32), (torch.rand(6, 3) > 0.5).float()
    difficult = torch.zeros(6, 3, dtype=torch.bool)
    difficult[1, 2] = True
    order = [[4, 1, 5], [0, 3, 2], [4]]
    loader = [(images[i], target[i], difficult[i], torch.tensor(i)) for i in order]
    empty = (torch.empty(0),) * 4
    statistics = engine.evaluate_streaming(model, [*loader[:2], (*empty, ["x.jpg: unreadable"]), loader[2]],
                                           Accelerator(cpu=True), MetricStatistics(3), show_progress=False)
    predictions = engine.predict(model, loader, Accelerator(cpu=True), show_progress=False)
    expected = compute_metrics(predictions.scores, predictions.target, predictions.difficult)
    found = statistics.compute()
    assert found["num_images"] == 6 and list(found) == list(expected)
    for name, value in expected.items():
        tolerance = 0.05 if name in ("map", "map_difficult") else 1e-9  # float32 scores of other batch sizes
        assert found[name] == pytest.approx(value, abs=tolerance, nan_ok=True), name
    with pytest.raises(ValueError, match="no images"):
        engine.evaluate_streaming(model, [empty], Accelerator(cpu=True), MetricStatistics(3), show_progress=False)
