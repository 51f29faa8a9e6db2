"""Export a model folder as ONNX or TorchScript: every task in one graph, with a dynamic batch axis.

The exported graph is ``inference.InferenceModel``: input ``image``, float32 (batch, 3, S, S), a face aligned as
ingest aligns it, resized to the card's ``input_size`` and normalised with its ``mean`` / ``std`` (of 0-1
pixel values); outputs per classification task its probabilities, and ``age``, ``age_low``, ``age_high``,
``age_std`` in years. ``out`` is a folder receiving the graph (``layout.ONNX_FILE`` or ``layout.TORCHSCRIPT_FILE``)
and the model card (``layout.MODEL_CARD``) with an ``export`` section listing inputs and outputs; the card also
travels inside the graph file (ONNX metadata, TorchScript extra file), so the file alone is enough.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from d2mtl import layout, store
from d2mtl.contracts import ExportInput, ExportRecord, ModelCard, model_card_json
from d2mtl.errors import UserError
from d2mtl.inference import AGE_INTERVAL, InferenceModel
from d2mtl.models import load_model
from d2mtl.tasks import TASKS

FORMATS = {"onnx": layout.ONNX_FILE, "torchscript": layout.TORCHSCRIPT_FILE}
INPUT_NAME = "image"
ONNX_OPSET = 18
TRACE_BATCH = 2  # example batch of the trace: not 1, which an exporter may treat as a constant


def output_shapes(graph: InferenceModel) -> dict[str, list[str | int]]:
    shapes: dict[str, list[str | int]] = {}
    for name in graph.output_names:
        task = TASKS.get(name)
        shapes[name] = ["batch", task.num_classes] if task and task.kind == "classification" else ["batch"]
    return shapes


def export_card(card: ModelCard, graph: InferenceModel, fmt: str, source: str) -> ModelCard:
    """The model card plus what a consumer of the exported file needs to feed it and read it."""
    size = card.input_size
    section = ExportRecord(
        format=fmt,
        file=FORMATS[fmt],
        source=source,
        torch=torch.__version__,
        opset=ONNX_OPSET if fmt == "onnx" else None,
        input=ExportInput(
            name=INPUT_NAME,
            dtype="float32",
            shape=["batch", 3, size, size],
            preprocessing="aligned face (d2mtl.faces template), resized to input_size, RGB, (pixel / 255 - mean) / std",
        ),
        outputs=output_shapes(graph),
        age_interval=graph.age_interval,
    )
    return card.model_copy(update={"export": section})


@contextlib.contextmanager
def quiet_loggers(*names: str, level: int = logging.WARNING) -> Iterator[None]:
    """Raise these loggers' levels for a while (the ONNX optimiser logs every pass at INFO, ~80 lines)."""
    loggers = [logging.getLogger(name) for name in names]
    saved = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(level, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        for logger, old in zip(loggers, saved, strict=True):
            logger.setLevel(old)


def onnx_bytes(graph: InferenceModel, example: torch.Tensor, card: ModelCard) -> bytes:
    batch = torch.export.Dim("batch", min=1)
    with quiet_loggers("onnx_ir", "onnxscript"):
        program = torch.onnx.export(
            graph,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=list(graph.output_names),
            dynamic_shapes=({0: batch},),
            opset_version=ONNX_OPSET,
            verbose=False,
        )
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = layout.MODEL_CARD, model_card_json(card)
    return proto.SerializeToString()


def torchscript_bytes(graph: InferenceModel, example: torch.Tensor, card: ModelCard) -> bytes:
    with warnings.catch_warnings():
        # torch.jit is deprecated for new code, but TorchScript is still the format LibTorch (C++) deployments load
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        traced = torch.jit.trace(graph, example)
        with tempfile.TemporaryDirectory(prefix="d2mtl-export-") as tmp:
            path = Path(tmp, layout.TORCHSCRIPT_FILE)
            torch.jit.save(traced, str(path), _extra_files={layout.MODEL_CARD: model_card_json(card)})
            return path.read_bytes()


def export_model(model: str, fmt: str, out: str, age_interval: float = AGE_INTERVAL) -> ModelCard:
    """Write ``model`` (a model folder) as ``fmt`` into the folder ``out``; returns the exported card."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; known: {', '.join(FORMATS)}")
    net, card = load_model(model, "cpu")
    graph = InferenceModel(net, age_interval).eval()
    size = card.input_size
    example = torch.randn(TRACE_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    card = export_card(card, graph, fmt, model)
    with torch.no_grad():
        data = onnx_bytes(graph, example, card) if fmt == "onnx" else torchscript_bytes(graph, example, card)
    store.write_bytes(store.join(out, FORMATS[fmt]), data)
    store.write_text(store.join(out, layout.MODEL_CARD), model_card_json(card))
    return card
