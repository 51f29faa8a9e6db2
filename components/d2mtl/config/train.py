"""Training config shared by the teacher, the single-task baselines and the student."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from d2mtl.config.fields import Threads
from d2mtl.tasks import TASKS, TaskList, TaskMap

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the normalisation torchvision's ImageNet weights were trained with
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelConfig(BaseModel):
    """The network (models.ModelSpec is built from it and the tasks) and how its backbone starts."""

    model_config = ConfigDict(extra="forbid")

    backbone: str = "mobilenet_v2"  # models.BACKBONES: mobilenet_v2, resnet18, resnet50, efficientnet_b0, convnext_tiny
    weights: str = "IMAGENET1K_V1"  # torchvision weights name of the backbone, DEFAULT, or none
    freeze_stages: int = 0  # leading backbone stages kept frozen (fewer to train: faster on CPU)
    dropout: float = 0.2  # before the task heads
    age_head: Literal["dex", "l1"] = "dex"  # dex: softmax over integer ages, expected value; l1: regression
    input_size: int = 64  # network input side in pixels (faces are stored larger)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # input normalisation, stored with the model
    std: tuple[float, float, float] = IMAGENET_STD


class AugmentConfig(BaseModel):
    """torchvision.transforms.v2 train augmentation; the eval transform only resizes and normalises."""

    model_config = ConfigDict(extra="forbid")

    hflip: float = Field(0.5, ge=0, le=1)  # probability of a horizontal flip
    crop_scale: tuple[float, float] = (0.75, 1.0)  # random resized crop: share of the face area kept
    crop_ratio: tuple[float, float] = (0.9, 1.1)  # random resized crop: aspect ratio range
    brightness: float = Field(0.3, ge=0)  # colour jitter strengths: factors in [1 - x, 1 + x] (0 disables)
    contrast: float = Field(0.3, ge=0)
    saturation: float = Field(0.3, ge=0)
    hue: float = Field(0.0, ge=0, le=0.5)  # off by default: the costliest jitter on CPU
    grayscale: float = Field(0.2, ge=0, le=1)  # probability of a gray copy, so colour and gray domains meet


class LRConfig(BaseModel):
    """Dynamic learning rate: range test -> one-cycle / cyclical schedule + plateau rule; or fixed."""

    model_config = ConfigDict(extra="forbid")

    schedule: Literal["one_cycle", "cyclic", "fixed"] = "one_cycle"  # fixed: constant `lr`, the ablation
    lr: float = 1e-3  # the fixed rate; also the peak when range_test is off
    range_test: bool = True  # pick the peak rate with an LR range test before training
    range_start: float = 1e-6  # range test: first rate
    range_end: float = 1.0  # range test: last rate (stops earlier when the loss diverges)
    range_steps: int = 60  # range test: batches (exponentially spaced rates)
    range_divisor: float = 10.0  # peak = rate at the smoothed-loss minimum / divisor
    warmup: float = 0.15  # one-cycle: share of the steps spent rising to the peak
    start_div: float = 25.0  # one-cycle: the first rate is peak / start_div
    final_div: float = 1e3  # one-cycle: the last rate is peak / final_div
    cycle_epochs: float = 1.0  # cyclic: length of one triangular cycle in epochs
    plateau_patience: int = 1  # epochs without val improvement before the rate is lowered (0: never)
    plateau_factor: float = 0.3  # multiply every later rate by this on a plateau


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: TaskList | None = None  # None: every task in the registry; [age]: a single-task baseline
    model: ModelConfig = Field(default_factory=ModelConfig)
    age_sigma: float = 2.0  # dex: std (years) of the soft target around the label / interval
    age_l1_weight: float = 0.1  # dex: weight of the L1 term on the expected age
    # data
    batch_size: int = 64  # the global batch: under torchrun each of N processes trains batch_size / N of it
    # how datasets share each epoch: proportional (every face alike), dataset (equal shares), task, or
    # temperature (dataset d's share proportional to n_d ** (1 / mix_temperature): 1 = proportional, large = equal)
    mix: Literal["proportional", "dataset", "task", "temperature"] = "proportional"
    mix_temperature: float = Field(2.0, gt=0)
    epoch_samples: int | None = None  # samples drawn per epoch; None: the train rows once each
    shard_window: int = 0  # face-table shards in memory per loader worker; 0: all (see d2mtl.data)
    num_workers: int = 1  # DataLoader worker processes per training process (0: decode in the training process)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    # optimisation
    epochs: int = 3
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    lr: LRConfig = Field(default_factory=LRConfig)
    # task-loss weighting; dataset_share: each training dataset an equal share of the loss, split evenly among
    # the tasks it labels (losses.dataset_share_weights), times task_weights
    weighting: Literal["fixed", "dataset_share", "uncertainty", "dwa"] = "fixed"
    task_weights: TaskMap[float] = Field(default_factory=dict)  # fixed, dataset_share: per-task factor, missing -> 1
    dwa_temperature: float = 2.0  # dwa: softness of the weights
    # run
    device: str = "auto"  # auto: cuda when available, else cpu
    threads: Threads = None  # config.fields.Threads
    seed: int = 0
    deterministic: bool = False  # torch deterministic algorithms (exact resume on CPU)
    checkpoint_every: int = 200  # also checkpoint every N optimiser steps (0: only per epoch)
    eval_batch_size: int = 256  # per training process
    progress: bool = True  # tqdm progress bars

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.model.input_size < 16 or self.batch_size < 1 or self.epochs < 1:
            raise ValueError("model.input_size >= 16, batch_size >= 1 and epochs >= 1 are required")
        return self

    @property
    def task_names(self) -> tuple[str, ...]:
        """The trained tasks in registry order."""
        return tuple(t for t in TASKS if self.tasks is None or t in self.tasks)


class StudentConfig(TrainConfig):
    pseudo_weight: float = 1.0  # weight of pseudo-label losses relative to ground truth
    targets: Literal["hard", "soft"] = "soft"  # soft: KL to the teacher's probabilities; hard: its label
    confidence_weighting: bool = True  # scale each pseudo-label's loss by the teacher's confidence
    init: Literal["imagenet", "scratch", "teacher"] = "imagenet"  # teacher: start from the teacher's weights
