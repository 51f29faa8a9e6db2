"""The multi-task network: a torchvision backbone found by name, one head per task of the registry.

Age is either a DEX head (Rothe et al., "Deep EXpectation of apparent age", ICCVW 2015: a softmax
over integer ages whose expected value is the prediction) or a plain L1 regression head.

A model folder holds ``layout.WEIGHTS_FILE`` (safetensors: loads without executing code) and
``layout.MODEL_CARD`` (``contracts.ModelCard``: the architecture spec the network is rebuilt from, the class
names, normalisation, training data summary and metrics). ``load_model`` refuses a folder whose tasks or
classes differ from the task registry.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import torch
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from d2mtl import layout, store
from d2mtl.config.train import ModelConfig
from d2mtl.contracts import MODEL_CARD_FORMAT, ModelCard, model_card_json, read_model_card
from d2mtl.devices import resolve_device
from d2mtl.errors import UserError
from d2mtl.tasks import AGE_MAX, AGE_MIN, TASKS

AGE_BINS = AGE_MAX - AGE_MIN + 1  # DEX: one class per integer age


class ModelError(UserError):
    """A model folder or backbone request that cannot be honoured."""


# ---- backbone registry -------------------------------------------------------------------------


def _features_stages(model: nn.Module) -> list[nn.Module]:
    return list(model.features)


def _resnet_stages(model: nn.Module) -> list[nn.Module]:
    return [nn.ModuleList([model.conv1, model.bn1]), model.layer1, model.layer2, model.layer3, model.layer4]


@dataclass(frozen=True)
class Backbone:
    """A torchvision classifier used as a feature extractor."""

    name: str  # torchvision model name
    classifier: str  # submodule replaced by Identity, leaving pooled features
    stages: Callable[[nn.Module], list[nn.Module]]  # ordered blocks, for partial freezing


BACKBONES: dict[str, Backbone] = {}


def register_backbone(name: str, classifier: str, stages: Callable[[nn.Module], list[nn.Module]]) -> None:
    BACKBONES[name] = Backbone(name, classifier, stages)


register_backbone("mobilenet_v2", "classifier", _features_stages)
register_backbone("resnet18", "fc", _resnet_stages)
register_backbone("resnet50", "fc", _resnet_stages)
register_backbone("efficientnet_b0", "classifier", _features_stages)
register_backbone("convnext_tiny", "classifier.2", _features_stages)  # keeps its LayerNorm + Flatten


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ModelError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}") from None


def resolve_weights(backbone: str, weights: str | None):
    """torchvision's weights enum member for ``weights`` (a name such as IMAGENET1K_V1, or DEFAULT); None for none."""
    if weights is None or weights.lower() == "none":
        return None
    enum = torchvision.models.get_model_weights(get_backbone(backbone).name)
    try:
        return enum[weights]
    except KeyError:
        known = ", ".join(["DEFAULT", *enum.__members__]) + ", none"
        raise ModelError(f"backbone {backbone} has no weights {weights!r}; known: {known}") from None


def _weights_cache_path(spec) -> Path:
    return Path(torch.hub.get_dir(), "checkpoints", Path(urlparse(spec.url).path).name)


def build_backbone(name: str, weights: str | None) -> tuple[nn.Module, int]:
    """The feature extractor (input (B, 3, H, W) -> (B, D)) and D."""
    backbone = get_backbone(name)
    spec = resolve_weights(name, weights)
    try:
        model = torchvision.models.get_model(backbone.name, weights=spec)
    except OSError as err:  # URLError is an OSError: offline and not in the cache
        raise ModelError(
            f"cannot load {name} weights {weights}: not in the torch cache ({_weights_cache_path(spec)}) and the "
            f"download failed ({err}). Set TORCH_HOME (now {os.environ.get('TORCH_HOME', 'unset')}) to a folder "
            f"holding hub/checkpoints/{_weights_cache_path(spec).name}, or set model.weights: none"
        ) from None
    head = model.get_submodule(backbone.classifier)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    feature_dim = linears[-1].in_features
    model.set_submodule(backbone.classifier, nn.Identity())
    return model, feature_dim


# ---- the network -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the network; stored in the model card."""

    backbone: str
    tasks: tuple[str, ...]
    age_head: Literal["dex", "l1"]
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dropout: float

    @classmethod
    def from_config(cls, model: ModelConfig, tasks: tuple[str, ...] | list[str]) -> ModelSpec:
        """From a TrainConfig's ``model`` section and the tasks."""
        return cls(
            backbone=model.backbone,
            tasks=tuple(tasks),
            age_head=model.age_head,
            input_size=model.input_size,
            mean=model.mean,
            std=model.std,
            dropout=model.dropout,
        )

    @classmethod
    def from_card(cls, card: ModelCard) -> ModelSpec:
        return cls(
            backbone=card.backbone,
            tasks=tuple(card.tasks),
            age_head=card.age_head,
            input_size=card.input_size,
            mean=card.mean,
            std=card.std,
            dropout=card.dropout,
        )

    def head_size(self, task: str) -> int:
        if TASKS[task].kind == "classification":
            return TASKS[task].num_classes
        return AGE_BINS if self.age_head == "dex" else 1


class MultiTaskNet(nn.Module):
    """Shared backbone -> dropout -> one linear head per task."""

    def __init__(self, spec: ModelSpec, weights: str | None = None):
        super().__init__()
        unknown = [t for t in spec.tasks if t not in TASKS]
        if unknown:
            raise ModelError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
        self.spec = spec
        self.backbone, feature_dim = build_backbone(spec.backbone, weights)
        self.dropout = nn.Dropout(spec.dropout)
        self.heads = nn.ModuleDict({t: nn.Linear(feature_dim, spec.head_size(t)) for t in spec.tasks})
        self.register_buffer("age_values", torch.arange(AGE_MIN, AGE_MAX + 1, dtype=torch.float32), persistent=False)

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.spec.tasks

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw head outputs: class logits (B, C); age logits (B, AGE_BINS) for dex, years (B,) for l1."""
        features = self.dropout(self.backbone(x))  # (B, D)
        out = {task: head(features) for task, head in self.heads.items()}
        if "age" in out and self.spec.age_head == "l1":
            out["age"] = out["age"].squeeze(1)
        return out

    def age_distribution(self, age_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expected age and its standard deviation (B,) from DEX logits (B, AGE_BINS)."""
        probs = age_logits.float().softmax(dim=1)
        mean = probs @ self.age_values
        var = probs @ self.age_values.square() - mean.square()
        return mean, var.clamp_min(0).sqrt()

    def decode(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Raw head outputs -> per classification task its probabilities (B, C); "age" expected years (B,),
        "age_std" (B,): the spread of the DEX distribution (zeros for an l1 head, which has none)."""
        result = {}
        for task, value in out.items():
            if TASKS[task].kind == "classification":
                result[task] = value.float().softmax(dim=1)
            elif self.spec.age_head == "dex":
                result["age"], result["age_std"] = self.age_distribution(value)
            else:
                result["age"] = value.float().clamp(AGE_MIN, AGE_MAX)
                result["age_std"] = torch.zeros_like(result["age"])
        return result

    @torch.inference_mode()
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``decode`` of a forward pass. Call on a network in eval mode (load_model returns one)."""
        return self.decode(self(x))

    def stages(self) -> list[nn.Module]:
        return get_backbone(self.spec.backbone).stages(self.backbone)

    def freeze_stages(self, count: int) -> None:
        """Freeze the first ``count`` backbone stages (weights and BatchNorm statistics)."""
        stages = self.stages()
        if count > len(stages):
            raise ModelError(f"freeze_stages {count}: {self.spec.backbone} has only {len(stages)} stages")
        self._frozen = stages[:count]
        for stage in self._frozen:
            stage.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> MultiTaskNet:
        super().train(mode)
        for stage in getattr(self, "_frozen", ()):
            stage.eval()
        return self


def build_model(cfg, weights: str | None = None) -> MultiTaskNet:
    """A network for a TrainConfig; ``weights`` overrides cfg.model.weights (e.g. "none")."""
    spec = ModelSpec.from_config(cfg.model, cfg.task_names)
    net = MultiTaskNet(spec, cfg.model.weights if weights is None else weights)
    if cfg.model.freeze_stages:
        net.freeze_stages(cfg.model.freeze_stages)
    return net


# ---- model folder: safetensors + model card -----------------------------------------------------


def class_names(tasks: tuple[str, ...] | list[str]) -> dict[str, list[str]]:
    return {t: list(TASKS[t].classes) for t in tasks if TASKS[t].kind == "classification"}


def weights_bytes(net: nn.Module) -> bytes:
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    return save_safetensors(state)


def save_model(net: MultiTaskNet, out: str, **records) -> ModelCard:
    """Write the weights and the card into the model folder ``out``; returns the card. ``records``: the card's
    optional fields (role, training, metrics, sources, pseudo_labels)."""
    data = weights_bytes(net)
    spec = net.spec
    card = ModelCard(
        format=MODEL_CARD_FORMAT,
        **asdict(spec),
        classes=class_names(spec.tasks),
        age_range=(AGE_MIN, AGE_MAX),
        weights_sha256=hashlib.sha256(data).hexdigest(),
        **records,
    )
    text = model_card_json(card)
    store.write_bytes(store.join(out, layout.WEIGHTS_FILE), data)
    store.write_text(store.join(out, layout.MODEL_CARD), text)
    return card


def check_card(card: ModelCard, where: str, tasks: tuple[str, ...] | list[str] | None = None) -> None:
    """Refuse a card with tasks/classes unlike the registry, or tasks unlike ``tasks``."""
    unknown = [t for t in card.tasks if t not in TASKS]
    if unknown:
        raise ModelError(
            f"{where}: trained for task(s) {', '.join(unknown)} that the task registry does not know "
            f"(known: {', '.join(TASKS)})"
        )
    expected = class_names(card.tasks)
    for task, names in card.classes.items():
        if names != expected.get(task):
            raise ModelError(
                f"{where}: {task} classes {names} differ from the registry's {expected.get(task)}; "
                "retrain, or use the d2mtl version that wrote this model"
            )
    if card.age_range != (AGE_MIN, AGE_MAX):
        raise ModelError(f"{where}: age range {list(card.age_range)} differs from the registry's {[AGE_MIN, AGE_MAX]}")
    if tasks is not None and set(tasks) != set(card.tasks):
        raise ModelError(
            f"{where}: model tasks {', '.join(card.tasks)} differ from the configured tasks {', '.join(tasks)}"
        )


def load_model(
    uri: str, device: str | torch.device = "cpu", tasks: tuple[str, ...] | list[str] | None = None
) -> tuple[MultiTaskNet, ModelCard]:
    """The network (eval mode, on ``device``) and its card from a model folder; ``tasks`` must match if given."""
    card = read_model_card(uri)
    check_card(card, uri, tasks)
    net = MultiTaskNet(ModelSpec.from_card(card), weights=None)
    try:
        state = load_safetensors(store.read_bytes(store.join(uri, layout.WEIGHTS_FILE)))
    except FileNotFoundError:
        raise ModelError(f"{uri}: no {layout.WEIGHTS_FILE}") from None
    except SafetensorError as err:  # e.g. a pickle renamed: never unpickled, refused
        raise ModelError(f"{uri}: {layout.WEIGHTS_FILE} is not a safetensors file ({err})") from None
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise ModelError(
            f"{uri}: weights do not fit the architecture in its card: {str(err).splitlines()[0]}"
        ) from None
    device = resolve_device(device) if isinstance(device, str) else device
    return net.to(device).eval(), card
