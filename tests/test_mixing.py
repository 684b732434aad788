"""Multi-label Mixup and CutMix (udtimm/mixing.py): hand-computed batches, the label policies under mixing, the draws
from (seed, epoch, step), the objectives and the training loop with a Mix, the flags and an exact resume."""

import random

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import tiny_train_args
from test_engine import run_settings
from test_losses import ref_bce
from test_reliability import assert_same_run, stopped_and_resumed
from test_soft_target_losses import ref_partial_softmax
from timm.data.mixup import cutmix_bbox_and_lam
from timm.scheduler import create_scheduler_v2

import distill
import train
from udtimm import config
from udtimm.config import ConfigError
from udtimm.data.base import UNKNOWN
from udtimm.engine import train_one_epoch
from udtimm.mixing import Mix, Mixer, cutmix_box
from udtimm.model import create_model
from udtimm.objectives import DistillationObjective, DistillOptions, SupervisedObjective
from udtimm.settings import MixingSettings, ModelSettings

U = UNKNOWN  # a label nobody annotated, short for the tables below
T, F = True, False


def labelled_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three images, four classes: the first and the last are mixed with each other, the middle one with itself."""
    target = torch.tensor([[1.0, 0, 1, U], [0, 1, 0, 0], [1, 1, 0, 0]])
    difficult = torch.tensor([[False, False, True, False], [False] * 4, [False, True, False, False]])
    return target, difficult


@pytest.mark.parametrize("difficult_policy, unknown_policy, first_row, first_mask", [
    # Each image's labels under the policies, then lam 0.25 of its own and 0.75 of its partner's.
    ("positive", "ignore", [1, 0.75, 0.25, 0], [T, T, T, F]),  # unknown in the first image: out of the loss
    ("ignore", "ignore", [1, 0.75, 0.25, 0], [T, F, F, F]),  # difficult in either image: out as well
    ("negative", "ignore", [1, 0, 0, 0], [T, T, T, F]),  # each difficult label a 0 in its own image
    ("positive", "negative", [1, 0.75, 0.25, 0], [T, T, T, T]),  # the unknown label a 0 in its own image
])
def test_mixup_of_a_hand_computed_batch(difficult_policy, unknown_policy, first_row, first_mask) -> None:
    images = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2), torch.full((1, 2, 2), 8.0)])
    mix = Mix(0.25)
    torch.testing.assert_close(mix.images(images), torch.stack(
        [torch.full((1, 2, 2), 6.0), torch.ones(1, 2, 2), torch.full((1, 2, 2), 2.0)]))
    target, mask = SupervisedObjective(difficult=difficult_policy, unknown=unknown_policy).labels(
        *labelled_batch(), mix)
    last_row = {"negative": [1, 0, 0, 0]}.get(difficult_policy, [1, 0.25, 0.75, 0])  # the same pair, the other way
    torch.testing.assert_close(target, torch.tensor([first_row, [0, 1, 0, 0], last_row], dtype=torch.float32))
    assert mask.tolist() == [first_mask, [T] * 4, first_mask]


def test_cutmix_of_a_hand_computed_batch() -> None:
    """lam 0.75 on 4 x 4 images: a 2 x 2 box around row 1, column 2, pasted from the partner; targets at 0.75."""
    mix = cutmix_box(0.75, (4, 4), (1, 2))
    assert mix == Mix(0.75, (0, 2, 1, 3))
    first, second = torch.arange(16.0).view(1, 4, 4), 100 + torch.arange(16.0).view(1, 4, 4)
    mixed = mix.images(torch.stack([first, second]))
    torch.testing.assert_close(mixed[0], torch.tensor([[[0.0, 101, 102, 3], [4, 105, 106, 7], [8, 9, 10, 11],
                                                        [12, 13, 14, 15]]]))
    torch.testing.assert_close(mixed[1], torch.tensor([[[100.0, 1, 2, 103], [104, 5, 6, 107], [108, 109, 110, 111],
                                                        [112, 113, 114, 115]]]))
    target, mask = mix.labels(torch.tensor([[1.0, 0, 1], [0, 1, 1]]), torch.tensor([[T, T, T], [T, F, T]]))
    torch.testing.assert_close(target, torch.tensor([[0.75, 0.25, 1], [0.25, 0.75, 1]]))
    assert mask.tolist() == [[T, F, T], [T, F, T]]


@pytest.mark.parametrize("size, lam, centre, expected", [
    ((4, 4), 0.75, (0, 0), Mix(1 - 1 / 16, (0, 1, 0, 1))),  # clipped at the corner: 1 pixel cut, not 4
    ((4, 8), 0.75, (3, 7), Mix(1 - 6 / 32, (2, 4, 5, 8))),
    ((32, 32), 0.9995, (5, 5), Mix(1.0, (5, 5, 5, 5))),  # a box under one pixel: nothing cut, lam 1
    ((7, 5), 0.3, (3, 2), Mix(1 - 20 / 35, (1, 6, 0, 4))),
])
def test_cutmix_lam_is_corrected_to_the_box_cut_as_timm_does(size, lam, centre, expected,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    assert cutmix_box(lam, size, centre) == expected
    centres = iter(centre)
    monkeypatch.setattr(np.random, "randint", lambda low, high, size=None: next(centres))  # timm's draw, given
    (top, bottom, left, right), timm_lam = cutmix_bbox_and_lam((3, *size), lam)
    assert (top, bottom, left, right) == expected.box and timm_lam == pytest.approx(expected.lam)


def draws(settings: MixingSettings, seed: int = 0, epochs: int = 2, steps: int = 30) -> list[Mix | None]:
    mixer = Mixer(settings, seed)
    return [mixer.draw(epoch, step, (32, 32)) for epoch in range(epochs) for step in range(steps)]


def seed_global_generators(seed: int) -> tuple:
    """Seed torch's, NumPy's and Python's global generators; their states after."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def test_the_draws_depend_on_seed_epoch_and_step_alone_and_leave_the_global_generators_alone() -> None:
    both = MixingSettings(mixup=0.4, cutmix=1.0)
    seed_global_generators(2)
    first = draws(both)
    torch_state, numpy_state, python_state = seed_global_generators(1)
    assert draws(both) == first  # whatever the global generators hold
    assert torch.equal(torch.get_rng_state(), torch_state) and np.array_equal(np.random.get_state()[1], numpy_state)
    assert random.getstate() == python_state  # and they do not move
    assert draws(both, seed=1) != first and first[:30] != first[30:]  # another seed, another epoch: other draws
    kinds = [mix.box is not None for mix in first]
    assert 0.3 < sum(kinds) / len(kinds) < 0.7  # --mixup-switch-prob 0.5
    assert all(mix.box is None for mix in draws(MixingSettings(mixup=0.4)))
    assert all(mix.box is not None for mix in draws(MixingSettings(cutmix=1.0)))
    assert all(mix.box is not None for mix in draws(MixingSettings(mixup=0.4, cutmix=1.0, mixup_switch_prob=1.0)))


def test_off_epoch_and_probability_decide_which_batches_mix() -> None:
    assert set(draws(MixingSettings())) == {None}
    assert set(draws(MixingSettings(mixup=0.4, mixup_prob=0.0))) == {None}
    off = draws(MixingSettings(mixup=0.4, mixup_off_epoch=1))
    assert None not in off[:30] and set(off[30:]) == {None}  # epoch 0 mixed, epoch 1 not
    half = draws(MixingSettings(mixup=0.4, mixup_prob=0.5), steps=100)
    assert 0.35 < half.count(None) / len(half) < 0.65


class Recording:
    """SupervisedObjective("bce"), recording the images and the Mix of every call."""

    def __init__(self) -> None:
        self.objective, self.calls = SupervisedObjective("bce"), []

    def __call__(self, model, images, target, difficult, mix=None) -> dict[str, torch.Tensor]:
        self.calls.append((images.clone(), mix))
        return self.objective(model, images, target, difficult, mix)


@pytest.mark.slow
@pytest.mark.parametrize("off_epoch", [0, 1], ids=["mixing", "off"])
def test_the_training_loop_hands_the_objective_the_mixed_batch_and_its_mix(off_epoch: int) -> None:
    torch.manual_seed(0)
    model = create_model(ModelSettings("test_resnet"), 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=2, step_on_epochs=False,
                                       updates_per_epoch=3, warmup_epochs=0)
    batches = [(torch.randn(4, 3, 32, 32), torch.ones(4, 3), torch.zeros(4, 3, dtype=torch.bool), torch.arange(4))
               for _ in range(3)]
    mixer, objective = Mixer(MixingSettings(mixup=0.4, cutmix=1.0, mixup_off_epoch=off_epoch), 0), Recording()
    settings = run_settings()
    train_one_epoch(model, batches, optimizer, scheduler, Accelerator(cpu=True), objective, epoch=1, num_updates=3,
                    optim=settings.optim, runtime=settings.runtime, mixer=mixer)
    for step, ((images, mix), batch) in enumerate(zip(objective.calls, batches, strict=True)):
        expected = mixer.draw(1, step, (32, 32))
        assert mix == expected and (expected is None) == (off_epoch == 1)
        assert torch.equal(images, batch[0] if mix is None else mix.images(batch[0]))


def test_eq12_and_the_distillation_ground_truth_term_read_the_mixed_labels() -> None:
    """Supervised terms on the mixed labels; distill.py's --unknown teacher fills the pairs unknown in either image with
    the teacher's probability on the mixed images, and its PAL-N reads the pairs known in both (float64 references)."""
    torch.manual_seed(0)
    teacher, student = (create_model(ModelSettings("test_resnet"), 4, cal=True).eval() for _ in range(2))
    mix = Mix(0.25)
    images = mix.images(torch.randn(3, 3, 32, 32))
    target, difficult = labelled_batch()
    out = student(images)
    z, c = out.logits.double(), out.cal_logits.double()
    terms = SupervisedObjective("bce", cal=True, cal_weight=0.1)(student, images, target, difficult, mix)
    mixed = torch.tensor([[1, 0.75, 0.25, 0], [0, 1, 0, 0], [1, 0.25, 0.75, 0]], dtype=torch.float64)
    known = torch.tensor([[T, T, T, F], [T] * 4, [T, T, T, F]])
    torch.testing.assert_close(terms["bce"].double(), ref_bce(z, mixed, known), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["partial_softmax"].double(), ref_partial_softmax(c, mixed, known), rtol=1e-5,
                               atol=1e-6)
    objective = DistillationObjective(teacher, DistillOptions(gt_weight=1.0, cal_weight=0.1), unknown="teacher")
    gt = objective(student, images, target, difficult, mix)["gt"]
    soft = torch.where(known, mixed, torch.sigmoid(teacher(images).logits.double()))
    expected = ref_bce(z, soft, torch.ones_like(known)) + 0.1 * ref_partial_softmax(c, mixed, known)
    torch.testing.assert_close(gt.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("flags, message", [
    (["--mixup", "-0.1"], "--mixup must be >= 0"),
    (["--cutmix", "-1"], "--cutmix must be >= 0"),
    (["--mixup-prob", "1.5"], r"--mixup-prob must be a probability in \[0, 1\]: got 1.5"),
    (["--mixup-switch-prob", "-0.2"], "--mixup-switch-prob must be a probability"),
    (["--mixup-off-epoch", "-3"], "--mixup-off-epoch must be an epoch >= 0"),
])
def test_bad_mixing_values_are_refused_naming_the_flag(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        train.parse_args(flags)


def test_the_flags_reach_the_settings_in_both_scripts_and_default_to_no_mixing() -> None:
    assert config.training_settings(train.parse_args([])).mixing == MixingSettings()
    flags = ["--mixup", "0.8", "--cutmix", "1.0", "--mixup-prob", "0.6", "--mixup-switch-prob", "0.3",
             "--mixup-off-epoch", "9"]
    expected = MixingSettings(mixup=0.8, cutmix=1.0, mixup_prob=0.6, mixup_switch_prob=0.3, mixup_off_epoch=9)
    assert config.training_settings(train.parse_args(flags)).mixing == expected
    assert config.training_settings(distill.parse_args(["--teacher-ckpt", "t", *flags])).mixing == expected


@pytest.mark.slow
def test_a_resumed_mixup_and_cutmix_run_is_bit_identical_to_an_uninterrupted_one(
        tiny_digits: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    flags = ("--mixup", "0.4", "--cutmix", "1.0")
    used, mix_images = [], Mix.images

    def recording(mix: Mix, images: torch.Tensor) -> torch.Tensor:
        used.append(mix)
        return mix_images(mix, images)

    with monkeypatch.context() as patch:
        patch.setattr(Mix, "images", recording)
        train.main(tiny_train_args(tiny_digits, str(tmp_path), "--experiment", "whole", *flags))
    # Every batch of the two epochs (6 steps each) was mixed, by both kinds, as --seed 0, the epoch and the step say.
    assert used == draws(MixingSettings(mixup=0.4, cutmix=1.0), steps=6)
    assert {mix.box is None for mix in used} == {True, False}
    stopped_and_resumed(tiny_train_args(tiny_digits, str(tmp_path), "--experiment", "stopped", *flags),
                        str(tmp_path / "stopped"), monkeypatch)
    assert_same_run(str(tmp_path / "stopped"), str(tmp_path / "whole"))


@pytest.mark.slow
def test_distill_py_teaches_on_the_mixed_batch_the_student_sees(tiny_digits: str, tiny_checkpoint: str, tmp_path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    mixed, seen = [], []
    mix_images, teacher_outputs = Mix.images, DistillationObjective.teacher_outputs

    def recording_mix(mix: Mix, images: torch.Tensor) -> torch.Tensor:
        mixed.append(mix_images(mix, images))
        return mixed[-1]

    def recording_teacher(objective: DistillationObjective, images: torch.Tensor) -> tuple:
        seen.append(images)
        return teacher_outputs(objective, images)

    monkeypatch.setattr(Mix, "images", recording_mix)
    monkeypatch.setattr(DistillationObjective, "teacher_outputs", recording_teacher)
    distill.main(tiny_train_args(tiny_digits, str(tmp_path), "--teacher-ckpt", tiny_checkpoint, "--method", "kd",
                                 "--mixup", "0.4", "--cutmix", "1.0", "--epochs", "1"))
    assert len(seen) == len(mixed) == 6 and all(a is b for a, b in zip(seen, mixed, strict=True))
