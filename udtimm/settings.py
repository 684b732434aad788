"""Typed settings: what the modules below the scripts get instead of the argparse Namespace (config.py builds them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from udtimm.data import DataSource
from udtimm.heads import LINEAR


@dataclass(frozen=True)
class DataSettings:
    """Which data, read and augmented how (the "data" flags)."""

    source: DataSource
    train_split: str
    val_split: str  # chooses best.safetensors (data_flags.resolve_selection; the test split with --select-on-test)
    img_size: int
    batch_size: int
    workers: int
    reprob: float
    hflip: float
    crop_scales: tuple[float, ...]
    aa: str | None  # timm RandAugment config
    cutout: float  # Cutout box side as a fraction of the image side (0: off)
    difficult: str  # how the training losses treat difficult labels
    unknown: str  # how the training losses treat unknown labels (docs/datasets.md#missing-labels)
    drop_labels: float  # the part of each class's training labels made unknown
    drop_labels_seed: int
    eval_difficult_negative: bool
    min_positives: int  # mAP averages the classes with at least this many evaluated positives
    class_groups: tuple[float, float] | None  # --class-groups: head above, tail below (None: VOC-LT's, scaled)
    eval_memory: str  # exact, binned or auto (udtimm.metric_statistics.binned_evaluation)
    eval_bins: int  # AP bins per class of the binned evaluation
    skip_corrupt: bool
    gpu_decode: bool
    prefetch: int | None
    test_split: str  # reports: evaluated once, at the end
    select_on_test: bool
    holdout_fraction: float  # --val-split holdout: the part of the train split left out of training
    holdout_seed: int


@dataclass(frozen=True)
class ModelSettings:
    """Which network, from which weights (the "model" flags). The defaults are the flags': a checkpoint's metadata,
    a benchmark or a test names the model and what differs from them."""

    model: str
    pretrained: bool = False
    pretrained_path: str | None = None
    initial_checkpoint: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    head: str = LINEAR  # linear (timm's classifier) or a spatial head of udtimm.heads
    head_kwargs: dict = field(default_factory=dict)
    global_pool: str | None = None
    drop: float = 0.0
    sync_bn: bool = False


@dataclass(frozen=True)
class OptimSettings:
    """Optimizer and learning-rate schedule (the "optimisation" flags)."""

    epochs: int
    opt: str
    lr: float
    head_lr_mult: float  # the classifier's (and calibration branch's) rate: this times the backbone's, every step
    momentum: float
    weight_decay: float
    sched: str
    warmup_epochs: int
    warmup_lr: float
    min_lr: float
    clip_grad: float | None
    decay_epochs: float  # --sched step
    decay_rate: float
    grad_accum_steps: int
    model_ema: bool
    model_ema_decay: float


@dataclass(frozen=True)
class RuntimeSettings:
    """Where the run lives and how it runs (the "runtime" flags, and --resume)."""

    seed: int
    output: str
    experiment: str | None
    resume: str | None
    mixed_precision: str
    channels_last: bool
    torchcompile: bool
    skip_nonfinite: bool
    eval_interval: int
    no_progress: bool
    log_with: str | None


@dataclass(frozen=True)
class MixingSettings:
    """Multi-label Mixup and CutMix of the training batches (the --mixup and --cutmix flags, timm's names and meanings;
    docs/method.md#mixup-and-cutmix). The defaults are the flags': no mixing."""

    mixup: float = 0.0  # alpha of Mixup's Beta(alpha, alpha); 0: off
    cutmix: float = 0.0  # alpha of CutMix's Beta(alpha, alpha); 0: off
    mixup_prob: float = 1.0  # probability that a batch is mixed
    mixup_switch_prob: float = 0.5  # probability of CutMix rather than Mixup when both are on
    mixup_off_epoch: int = 0  # no mixing from this epoch on; 0: never off


@dataclass(frozen=True)
class TrainingSettings:
    """Everything train.py and distill.py share; each script keeps its method's own flags."""

    data: DataSettings
    model: ModelSettings
    optim: OptimSettings
    runtime: RuntimeSettings
    mixing: MixingSettings
    saved_args: dict  # the resolved arguments, written to args.yaml (enough to rerun with -c)
