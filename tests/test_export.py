"""Export: ONNX Runtime and TorchScript give what the torch graph gives, for any batch size; the card travels.

Tolerances (float32, same inputs): probabilities within 2e-4 absolute, years (expected age, spread) within 0.02;
the interval bounds are whole years and may move by one where the CDF sits on a quantile (allowed for one face,
or 5% of them).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from d2mtl import layout, store
from d2mtl.cli import main
from d2mtl.config.train import ModelConfig
from d2mtl.errors import UserError
from d2mtl.export import export_model
from d2mtl.inference import InferenceModel
from d2mtl.models import ModelSpec, MultiTaskNet, load_model, save_model
from d2mtl.tasks import TASKS

PROB_ATOL, YEARS_ATOL = 2e-4, 2e-2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A tiny model whose outputs vary with the input and are far from uniform, so that differences show.

    At initialisation MobileNetV2's features barely depend on the input: BatchNorm statistics are measured on
    random batches first, and the heads scaled up."""
    torch.manual_seed(0)
    net = MultiTaskNet(ModelSpec.from_config(ModelConfig(input_size=32), TASKS), weights=None).train()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # cumulative average over the calibration batches
        for _ in range(3):
            net(torch.randn(32, 3, 32, 32))
        for head in net.heads.values():
            head.weight.mul_(10)
    out = str(tmp_path_factory.mktemp("model") / "student")
    save_model(net, out)
    return out


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory) -> dict[str, str]:
    folders = {fmt: str(tmp_path_factory.mktemp("exports") / fmt) for fmt in ("onnx", "torchscript")}
    for fmt, folder in folders.items():
        export_model(model_dir, fmt, folder)
    return folders


def reference(model_dir: str, x: torch.Tensor) -> dict[str, np.ndarray]:
    graph = InferenceModel(load_model(model_dir)[0]).eval()
    with torch.no_grad():
        return {name: value.numpy() for name, value in zip(graph.output_names, graph(x), strict=True)}


def load_torchscript(path: str) -> tuple[torch.jit.ScriptModule, dict]:
    extra = {layout.MODEL_CARD: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, still the TorchScript loader
        module = torch.jit.load(path, _extra_files=extra)
    return module, json.loads(extra[layout.MODEL_CARD])


def assert_parity(expected: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> None:
    assert list(got) == list(expected)
    for name, value in expected.items():
        assert got[name].shape == value.shape, name
        if name in ("age_low", "age_high"):
            moved = np.abs(got[name] - value)
            assert moved.max() <= 1 and moved.sum() <= max(1, 0.05 * len(moved)), name
        else:
            atol = PROB_ATOL if value.ndim == 2 else YEARS_ATOL
            np.testing.assert_allclose(got[name], value, atol=atol, rtol=0, err_msg=name)


def inputs(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_outputs_are_far_from_uniform(model_dir):
    """Guards the parity tests: with near-uniform outputs any exporter would pass them."""
    out = reference(model_dir, inputs(8, 0))
    assert out["expression"].max(axis=1).mean() > 0.5 and (out["age_high"] - out["age_low"]).mean() < 60
    assert out["age"].std() > 1 and out["gender"][:, 0].std() > 0.05


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_onnx_runtime_matches_torch(model_dir, exported, batch):
    session = ort.InferenceSession(store.join(exported["onnx"], layout.ONNX_FILE), providers=["CPUExecutionProvider"])
    x = inputs(batch, batch)
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, {"image": x.numpy()}), strict=True))
    assert_parity(reference(model_dir, x), got)


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_torchscript_matches_torch(model_dir, exported, batch):
    module, card = load_torchscript(store.join(exported["torchscript"], layout.TORCHSCRIPT_FILE))
    x = inputs(batch, batch)
    with torch.no_grad():
        got = {name: value.numpy() for name, value in zip(card["export"]["outputs"], module(x), strict=True)}
    assert_parity(reference(model_dir, x), got)


def test_the_card_travels_with_each_export(model_dir, exported):
    original = json.loads(store.read_text(store.join(model_dir, layout.MODEL_CARD)))
    onnx_model = onnx.load(store.join(exported["onnx"], layout.ONNX_FILE))
    inside_onnx = json.loads({p.key: p.value for p in onnx_model.metadata_props}[layout.MODEL_CARD])
    _, inside_ts = load_torchscript(store.join(exported["torchscript"], layout.TORCHSCRIPT_FILE))
    for fmt, inside in (("onnx", inside_onnx), ("torchscript", inside_ts)):
        beside = json.loads(store.read_text(store.join(exported[fmt], layout.MODEL_CARD)))
        assert inside == beside
        assert {k: v for k, v in beside.items() if k != "export"} == original
        assert beside["export"]["format"] == fmt and beside["export"]["input"]["shape"] == ["batch", 3, 32, 32]
    [image] = onnx_model.graph.input
    assert image.name == "image" and image.type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis
    assert [o.name for o in onnx_model.graph.output] == list(inside_onnx["export"]["outputs"])
    assert inside_onnx["export"]["outputs"]["race"] == ["batch", 5]


def test_single_task_model_exported_to_s3_through_the_cli(s3_env, tmp_path, capsys):
    net = MultiTaskNet(ModelSpec.from_config(ModelConfig(age_head="l1", input_size=32), ("age",)), weights=None)
    save_model(net, str(tmp_path / "m"))
    assert (
        main(["export", "--model", str(tmp_path / "m"), "--format", "torchscript", "--out", "s3://bucket/exports/ts"])
        == 0
    )
    assert "s3://bucket/exports/ts/model.torchscript.pt" in capsys.readouterr().out
    with store.local_path(f"s3://bucket/exports/ts/{layout.TORCHSCRIPT_FILE}") as path:
        module, card = load_torchscript(str(path))
    assert card == json.loads(store.read_text(f"s3://bucket/exports/ts/{layout.MODEL_CARD}"))
    assert list(card["export"]["outputs"]) == ["age", "age_low", "age_high", "age_std"]
    x = inputs(4, 1)
    with torch.no_grad():
        got = {name: value.numpy() for name, value in zip(card["export"]["outputs"], module(x), strict=True)}
    assert_parity(reference(str(tmp_path / "m"), x), got)


def test_unknown_format_and_missing_model_are_user_errors(model_dir, tmp_path):
    with pytest.raises(UserError, match="unknown export format"):
        export_model(model_dir, "tflite", str(tmp_path / "x"))
    with pytest.raises(UserError, match="not a model folder"):
        export_model(str(tmp_path / "none"), "onnx", str(tmp_path / "x"))
