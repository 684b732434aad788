import math

import pytest
import torch
from accelerate import Accelerator
from timm.scheduler import create_scheduler_v2

from udtimm import engine
from udtimm.engine import LossReadout, NonFiniteLossError, bare_model, train_one_epoch
from udtimm.model import create_model


def test_bare_model_strips_torch_compile_so_checkpoint_keys_stay_plain() -> None:
    model = create_model("test_resnet", num_classes=3, cal=True)
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

    def __call__(self, model, images, target, difficult) -> dict[str, torch.Tensor]:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(images).logits, target)
        loss = loss * math.nan if self.calls in self.nan_steps else loss
        self.calls += 1
        return {"bce": loss, "loss": loss}


def run_epoch(objective: CountingObjective, steps: int = 5, skip_nonfinite: bool = False) -> dict[str, float]:
    torch.manual_seed(0)
    model = create_model("test_resnet", num_classes=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=1, step_on_epochs=False,
                                       updates_per_epoch=steps, warmup_epochs=0)
    batches = [(torch.randn(4, 3, 32, 32), torch.ones(4, 3), torch.zeros(4, 3, dtype=torch.bool), torch.arange(4))
               for _ in range(steps)]
    return train_one_epoch(model, batches, optimizer, scheduler, Accelerator(cpu=True), objective, epoch=2,
                           num_updates=0, skip_nonfinite=skip_nonfinite, show_progress=False)


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
