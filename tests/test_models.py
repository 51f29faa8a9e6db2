"""Backbone registry, heads, predict, and the model folder (safetensors + card) round trip."""

from __future__ import annotations

import json
import urllib.error

import pytest
import torch
from pydantic import ValidationError

from d2mtl import contracts, layout
from d2mtl.config.train import ModelConfig, TrainConfig
from d2mtl.contracts import ContractError
from d2mtl.models import (
    AGE_BINS,
    BACKBONES,
    ModelError,
    ModelSpec,
    MultiTaskNet,
    build_model,
    load_model,
    save_model,
)
from d2mtl.tasks import AGE_MAX, AGE_MIN, TASKS


def tiny(tasks: list[str] | None = None, **overrides) -> MultiTaskNet:
    return build_model(TrainConfig(tasks=tasks, model=ModelConfig(weights="none", input_size=32, **overrides)))


def test_every_backbone_builds_and_gives_one_head_per_task():
    for name in BACKBONES:
        with torch.device("meta"):  # shapes only: no weight init, no compute
            net = MultiTaskNet(
                ModelSpec.from_config(ModelConfig(backbone=name, input_size=32), TASKS), weights=None
            ).eval()
            out = net(torch.randn(2, 3, 32, 32))
        assert set(out) == set(TASKS), name
        assert out["age"].shape == (2, AGE_BINS) and out["expression"].shape == (2, 7), name
        assert net.stages(), name


def test_unknown_backbone_and_weights_are_user_errors():
    with pytest.raises(ModelError, match="unknown backbone 'vgg'"):
        tiny(backbone="vgg")
    with pytest.raises(ModelError, match="no weights 'IMAGENET9'"):
        build_model(TrainConfig(model=ModelConfig(weights="IMAGENET9")))


def test_unavailable_weights_offline_give_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    expected = r"resnet18 weights IMAGENET1K_V1: not in the torch cache .*resnet18-f37072fd"
    with pytest.raises(ModelError, match=expected) as err:
        build_model(TrainConfig(model=ModelConfig(backbone="resnet18", weights="IMAGENET1K_V1")))
    assert f"Set TORCH_HOME (now {tmp_path}) to a folder holding hub/checkpoints/resnet18-f37072fd" in str(err.value)


def test_mobilenet_imagenet_weights_load_from_the_shared_cache():
    from pathlib import Path

    if not Path(torch.hub.get_dir(), "checkpoints", "mobilenet_v2-b0353104.pth").exists():
        pytest.skip("MobileNetV2 ImageNet weights not in TORCH_HOME")
    reference = __import__("torchvision").models.mobilenet_v2(weights="IMAGENET1K_V1")
    net = build_model(TrainConfig(model=ModelConfig(weights="IMAGENET1K_V1")))
    assert torch.equal(net.backbone.features[0][0].weight, reference.features[0][0].weight)


def test_predict_gives_probabilities_expected_age_and_spread():
    net = tiny().eval()
    pred = net.predict(torch.randn(4, 3, 32, 32))
    for task in ("gender", "race", "expression"):
        assert pred[task].shape == (4, TASKS[task].num_classes)
        assert torch.allclose(pred[task].sum(1), torch.ones(4))
    assert pred["age"].shape == (4,) and ((pred["age"] >= AGE_MIN) & (pred["age"] <= AGE_MAX)).all()
    assert (pred["age_std"] > 0).all()


def test_l1_age_head_predicts_years_without_spread():
    net = tiny(age_head="l1", tasks=["age"]).eval()
    out = net(torch.randn(3, 3, 32, 32))
    assert set(out) == {"age"} and out["age"].shape == (3,)
    pred = net.predict(torch.randn(3, 3, 32, 32))
    assert torch.equal(pred["age_std"], torch.zeros(3))


def test_dex_expected_age_of_a_peaked_distribution():
    net = tiny(tasks=["age"])
    logits = torch.full((1, AGE_BINS), -50.0)
    logits[0, 37 - AGE_MIN] = 50.0
    mean, std = net.age_distribution(logits)
    assert mean.item() == pytest.approx(37.0) and std.item() == pytest.approx(0.0, abs=1e-3)


def test_freeze_stages_stops_gradients_and_batchnorm_updates():
    net = tiny(freeze_stages=3)
    frozen = net.stages()[:3]
    net.train()
    assert all(not p.requires_grad for s in frozen for p in s.parameters())
    assert all(not m.training for s in frozen for m in s.modules())
    assert net.stages()[3].training
    with pytest.raises(ModelError, match="has only 19 stages"):
        tiny(freeze_stages=40)


def test_save_and_load_round_trip(tmp_path):
    net = tiny().eval()
    card = save_model(net, str(tmp_path / "m"), role="teacher", metrics={"val": {"gender_acc": 0.5}})
    loaded, loaded_card = load_model(str(tmp_path / "m"))
    x = torch.randn(2, 3, 32, 32)
    assert not loaded.training
    for key, value in net.predict(x).items():
        assert torch.equal(value, loaded.predict(x)[key]), key
    assert loaded_card == card
    assert card.input_size == 32 and card.classes["gender"] == ["male", "female"]
    assert card.tasks == list(TASKS) and card.mean == (0.485, 0.456, 0.406)


def test_model_card_round_trip(tmp_path):
    training = {
        "config": TrainConfig().model_dump(mode="json"),
        "data": {"train": {"utk": {"rows": 3, "age": 3}}, "val": {}, "test": {}, "unmatched_labels": 0},
        "faces": {"image_size": "32", "template": contracts.FACE_TEMPLATE_NAME},
        "inputs": {"faces": "f" * 64, "labels": "l" * 64},
        "epochs": 1,
        "peak_lr": None,
        "train_seconds": 1.5,
    }
    card = save_model(
        tiny(tasks=["age"]),
        str(tmp_path / "m"),
        role="teacher",
        training=training,
        metrics={"val": {}, "test": {"age_mae": 3.5, "age_n": 4, "loss_mean": float("nan")}},
        sources={"faces": "f", "labels": "l"},
    )
    written = json.loads((tmp_path / "m" / layout.MODEL_CARD).read_text())
    assert written["format"] == contracts.MODEL_CARD_FORMAT == "d2mtl-model/1"
    assert written["training"] == training and written["sources"] == {"faces": "f", "labels": "l"}
    assert "processes" not in written["training"] and "pseudo_labels" not in written and "export" not in written
    assert written["metrics"]["test"]["age_n"] == 4 and isinstance(written["metrics"]["test"]["age_n"], int)
    read = contracts.read_model_card(str(tmp_path / "m"))
    assert read.model_dump(exclude={"metrics"}) == card.model_dump(exclude={"metrics"}) and read.face_size == 32
    assert contracts.model_card_json(read) == (tmp_path / "m" / layout.MODEL_CARD).read_text()


def test_a_card_of_another_version_or_missing_a_field_is_refused(tmp_path):
    folder = tmp_path / "m"
    save_model(tiny(tasks=["age"]), str(folder))
    card_file = str(folder / layout.MODEL_CARD)
    _rewrite_card(folder, format="d2mtl-model/2")
    with pytest.raises(ContractError, match=f"{card_file}: model card format 'd2mtl-model/2' is not supported"):
        load_model(str(folder))
    fields = json.loads((folder / layout.MODEL_CARD).read_text())
    del fields["format"]
    (folder / layout.MODEL_CARD).write_text(json.dumps(fields))
    with pytest.raises(ContractError, match="model card format None is not supported"):
        contracts.read_model_card(str(folder))
    _rewrite_card(folder, format=contracts.MODEL_CARD_FORMAT)
    fields = json.loads((folder / layout.MODEL_CARD).read_text())
    del fields["input_size"]
    (folder / layout.MODEL_CARD).write_text(json.dumps(fields))
    with pytest.raises(
        ContractError, match=f"{card_file}: not a valid d2mtl-model/1 model card \\(input_size: Field required\\)"
    ):
        load_model(str(folder))
    (folder / layout.MODEL_CARD).write_text("{not json")
    with pytest.raises(ContractError, match=f"{card_file}: not a JSON model card"):
        load_model(str(folder))
    card = save_model(tiny(tasks=["age"]), str(tmp_path / "other"))
    with pytest.raises(ValidationError, match="format"):  # validated on write, also after model_copy
        contracts.model_card_json(card.model_copy(update={"format": "d2mtl-model/2"}))


def _rewrite_card(folder, **changes):
    path = folder / layout.MODEL_CARD
    card = json.loads(path.read_text())
    card.update(changes)
    path.write_text(json.dumps(card))


def test_a_model_with_other_classes_or_tasks_is_refused(tmp_path):
    folder = tmp_path / "m"
    save_model(tiny(), str(folder))
    _rewrite_card(
        folder,
        classes={
            "gender": ["female", "male"],
            "race": list(TASKS["race"].classes),
            "expression": list(TASKS["expression"].classes),
        },
    )
    with pytest.raises(ModelError, match=r"gender classes \['female', 'male'\] differ from the registry"):
        load_model(str(folder))
    _rewrite_card(folder, tasks=["age", "gender", "race", "expression", "beauty"])
    with pytest.raises(ModelError, match="beauty"):
        load_model(str(folder))

    other = tmp_path / "single"
    save_model(tiny(tasks=["gender"]), str(other))
    with pytest.raises(ModelError, match="differ from the configured tasks"):
        load_model(str(other), tasks=list(TASKS))
    assert load_model(str(other), tasks=["gender"])[1].tasks == ["gender"]


def test_missing_folder_and_mismatched_weights_are_user_errors(tmp_path):
    with pytest.raises(ContractError, match="not a model folder"):
        load_model(str(tmp_path / "nothing"))
    folder = tmp_path / "m"
    save_model(tiny(tasks=["gender"]), str(folder))
    _rewrite_card(folder, tasks=["race"], classes={"race": list(TASKS["race"].classes)})
    with pytest.raises(ModelError, match="weights do not fit"):
        load_model(str(folder))


def test_model_folder_on_s3(s3_env):
    net = tiny(tasks=["expression"]).eval()
    save_model(net, "s3://bucket/models/m")
    loaded, _card = load_model("s3://bucket/models/m")
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(loaded.predict(x)["expression"], net.predict(x)["expression"])
