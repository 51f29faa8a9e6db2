"""The contracts between stages: the Parquet tables (face table, label table, pseudo-label table) with their
metadata keys, the face alignment template, and the model card.

Documented for humans in docs/contracts.md; this module is the executable form. Every table file
carries ``d2mtl.schema`` = ``<table>/<version>`` in its Parquet metadata, every model card its ``format``,
and readers refuse a table, card or version they do not know.

The face table is sharded: ``<faces>/part-00000-<sha256 prefix>.parquet``, ... plus
``<faces>/_manifest.json``, written last, which lists the shards, their row counts and content
hashes. Readers go by the manifest only, so a half-written face table is never read, and shards
are named by their content, so two writers under one prefix cannot mix their rows.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, ValidationError

from d2mtl import layout, store
from d2mtl.errors import UserError
from d2mtl.tasks import TASKS

SCHEMA_KEY = b"d2mtl.schema"
FACES, LABELS, PSEUDO, PSEUDO_PART = "faces", "labels", "pseudo", "pseudo_part"
VERSIONS = {FACES: 1, LABELS: 1, PSEUDO: 1, PSEUDO_PART: 1}
# face-manifest metadata, which training copies into the model card (ModelCard.training.faces)
IMAGE_SIZE = "image_size"  # side in pixels of the stored faces, which predict aligns new faces to
TEMPLATE = "template"  # the alignment template of the faces: FACE_TEMPLATE_NAME
EVALUATE_ONLY = "evaluate_only"  # JSON list of the datasets whose labels only evaluation reads
# pseudo-label stage metadata
PSEUDO_PART_KEY = "d2mtl.pseudo.part"  # part-table metadata: shard, provenance
PSEUDO_PROVENANCE_KEY = "d2mtl.pseudo"  # pseudo-table metadata: teachers, transforms, rules, holdout
HOLDOUT_KEY = "d2mtl.holdout"  # label-table metadata of write_holdout_labels: which labels it hides

# The face alignment template: ingest aligns the training faces to it, predict and serve align new faces to it.
# 112 x 112: left eye, right eye, nose tip, left and right mouth corner (image left / right); see d2mtl.faces.
FACE_TEMPLATE_NAME = "tight_5pt_v1"
FACE_TEMPLATE_112 = np.array([[34.8, 38.0], [77.2, 38.0], [56.0, 63.0], [38.5, 80.5], [73.5, 80.5]], dtype=np.float32)

SPLITS = ("train", "val", "test")


class ContractError(UserError):
    """A table that does not follow its contract."""


FACE_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),  # sha1(dataset + "/" + source path)[:16], stable
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("domain", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),  # train | val | test
        pa.field("subject", pa.string()),  # subject id where the dataset has one
        pa.field("image", pa.binary(), nullable=False),  # JPEG of the aligned face, RGB, image_size x image_size
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("det_score", pa.float32()),  # null for trusted crops
        pa.field("box", pa.list_(pa.float32(), 4)),  # x1, y1, x2, y2 in source pixels
        pa.field("landmarks", pa.list_(pa.float32(), 10)),  # 5 points (eyes, nose, mouth corners) x, y in source pixels
        pa.field("alignment", pa.string(), nullable=False),  # aligned | trusted_crop
    ]
)


def label_schema() -> pa.Schema:
    """sample_id, one nullable column per task, plus an age-group interval for group-only datasets."""
    fields = [pa.field("sample_id", pa.string(), nullable=False)]
    fields += [pa.field(task.name, pa.float32() if task.kind == "regression" else pa.int8()) for task in TASKS.values()]
    fields += [pa.field("age_low", pa.float32()), pa.field("age_high", pa.float32())]  # inclusive group bounds
    return pa.schema(fields)


def pseudo_schema() -> pa.Schema:
    """Per classification task: label, confidence, probabilities, kept; age: expected value, spread, kept."""
    fields = [pa.field("sample_id", pa.string(), nullable=False), pa.field("dataset", pa.string(), nullable=False)]
    for task in TASKS.values():
        if task.kind == "classification":
            fields += [
                pa.field(f"{task.name}", pa.int8()),
                pa.field(f"{task.name}_confidence", pa.float32()),
                pa.field(f"{task.name}_probs", pa.list_(pa.float32(), task.num_classes)),
                pa.field(f"{task.name}_kept", pa.bool_()),
            ]
        else:
            fields += [
                pa.field(f"{task.name}", pa.float32()),
                pa.field(f"{task.name}_spread", pa.float32()),
                pa.field(f"{task.name}_kept", pa.bool_()),
            ]
    return pa.schema(fields)


def pseudo_part_schema() -> pa.Schema:
    """One shard's predictions before selection: the pseudo columns without ``_kept``, plus per task the label
    of record (``_known``: class code; for age whether an age or age group is known) and, in holdout mode, the
    hidden truth (``_hidden``). The merge selects over all parts at once, so sharding cannot change the result."""
    fields = [field for field in pseudo_schema() if not field.name.endswith("_kept")]
    for task in TASKS.values():
        value = pa.float32() if task.kind == "regression" else pa.int8()
        fields += [
            pa.field(f"{task.name}_known", pa.bool_() if task.kind == "regression" else pa.int8()),
            pa.field(f"{task.name}_hidden", value),
        ]
    return pa.schema(fields)


LABEL_SCHEMA = label_schema()
PSEUDO_SCHEMA = pseudo_schema()
PSEUDO_PART_SCHEMA = pseudo_part_schema()
SCHEMAS = {FACES: FACE_SCHEMA, LABELS: LABEL_SCHEMA, PSEUDO: PSEUDO_SCHEMA, PSEUDO_PART: PSEUDO_PART_SCHEMA}


def _with_version(table: pa.Table, kind: str, extra: dict[str, str] | None = None) -> pa.Table:
    expected = SCHEMAS[kind]
    missing = [name for name in expected.names if name not in table.schema.names]
    if missing:
        raise ContractError(f"{kind} table lacks column(s) {', '.join(missing)}")
    table = table.select(expected.names).cast(expected)
    metadata = {SCHEMA_KEY: f"{kind}/{VERSIONS[kind]}".encode()}
    metadata.update({k.encode(): v.encode() for k, v in (extra or {}).items()})
    return table.replace_schema_metadata(metadata)


def check_version(schema: pa.Schema, kind: str, where: str) -> None:
    raw = (schema.metadata or {}).get(SCHEMA_KEY)
    if raw is None:
        raise ContractError(f"{where}: not a d2mtl {kind} table (no {SCHEMA_KEY.decode()} metadata)")
    found_kind, _, version = raw.decode().partition("/")
    if found_kind != kind:
        raise ContractError(f"{where}: is a {found_kind} table, expected {kind}")
    if version != str(VERSIONS[kind]):
        raise ContractError(
            f"{where}: {kind} schema version {version} is not supported "
            f"(this d2mtl reads version {VERSIONS[kind]}); re-run the stage that wrote it"
        )


def table_to_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def write_table(table: pa.Table, uri: str, kind: str, metadata: dict[str, str] | None = None) -> None:
    """Validate against the contract, stamp the version and write one Parquet file atomically."""
    store.write_bytes(uri, table_to_bytes(_with_version(table, kind, metadata)))


def read_table(uri: str, kind: str, columns: list[str] | None = None) -> pa.Table:
    """Read a whole single-file table (labels, pseudo-labels), refusing unknown versions."""
    with store.local_path(uri, ".parquet") as path:
        parquet = pq.ParquetFile(path)
        check_version(parquet.schema_arrow, kind, uri)
        return parquet.read(columns=columns)


def table_metadata(uri: str) -> dict[str, str]:
    with store.local_path(uri, ".parquet") as path:
        raw = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in raw.items()}


class FaceTableWriter:
    """Writes face rows as shards of ``shard_rows``; ``close()`` commits them with the manifest."""

    def __init__(self, uri: str, shard_rows: int = 2048, metadata: dict[str, str] | None = None):
        self.uri, self.shard_rows, self.metadata = uri, shard_rows, metadata or {}
        self._rows: list[dict] = []
        self._shards: list[dict] = []

    def write(self, row: dict) -> None:
        self._rows.append(row)
        if len(self._rows) >= self.shard_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        table = pa.Table.from_pylist(self._rows, schema=FACE_SCHEMA)
        data = table_to_bytes(_with_version(table, FACES, self.metadata))
        digest = hashlib.sha256(data).hexdigest()
        # named by content: a concurrent writer under the same prefix cannot replace a shard this manifest lists
        name = f"part-{len(self._shards):05d}-{digest[:12]}.parquet"
        store.write_bytes(store.join(self.uri, name), data)
        self._shards.append({"path": name, "rows": len(self._rows), "sha256": digest})
        self._rows = []

    def close(self) -> dict:
        self._flush()
        manifest = {
            "schema": f"{FACES}/{VERSIONS[FACES]}",
            "shards": self._shards,
            "rows": sum(s["rows"] for s in self._shards),
            "metadata": self.metadata,
        }
        store.write_text(store.join(self.uri, layout.FACES_MANIFEST), json.dumps(manifest, indent=1))
        return manifest


def read_manifest(uri: str) -> dict:
    if not store.is_remote(uri) and Path(uri).is_file():
        raise ContractError(
            f"{uri} is a file; expected a face table folder (holding {layout.FACES_MANIFEST}), "
            "e.g. the faces/ of an ingest output"
        )
    manifest_uri = store.join(uri, layout.FACES_MANIFEST)
    try:
        manifest = json.loads(store.read_text(manifest_uri))
    except FileNotFoundError:
        raise ContractError(
            f"{uri}: no {layout.FACES_MANIFEST}; not a face table, or its writer did not finish"
        ) from None
    if manifest.get("schema") != f"{FACES}/{VERSIONS[FACES]}":
        raise ContractError(
            f"{uri}: face table schema {manifest.get('schema')} is not supported "
            f"(this d2mtl reads {FACES}/{VERSIONS[FACES]})"
        )
    return manifest


def face_shards(uri: str) -> list[str]:
    return [store.join(uri, shard["path"]) for shard in read_manifest(uri)["shards"]]


def iter_face_batches(
    uri: str, columns: list[str] | None = None, shards: Iterable[str] | None = None, batch_rows: int = 1024
) -> Iterator[pa.RecordBatch]:
    """Stream record batches shard by shard: memory stays bounded by one shard."""
    for shard_uri in shards if shards is not None else face_shards(uri):
        with store.local_path(shard_uri, ".parquet") as path:
            parquet = pq.ParquetFile(path)
            check_version(parquet.schema_arrow, FACES, shard_uri)
            yield from parquet.iter_batches(batch_size=batch_rows, columns=columns)


def read_face_columns(uri: str, columns: list[str]) -> pa.Table:
    """The given (small) columns of every face row, e.g. sample_id, dataset, split."""
    if "image" in columns:
        raise ContractError("read_face_columns is for metadata columns; stream images with iter_face_batches")
    batches = list(iter_face_batches(uri, columns=columns))
    schema = pa.schema([FACE_SCHEMA.field(name) for name in columns])
    return pa.Table.from_batches(batches, schema=schema) if batches else schema.empty_table()


def content_hash(uri: str) -> str:
    """sha256 of a table's content: of a face table's manifest (which lists its shards' sha256), or of a single-file
    table's bytes (labels, pseudo-labels)."""
    manifest = store.join(uri, layout.FACES_MANIFEST)
    return hashlib.sha256(store.read_bytes(manifest if store.exists(manifest) else uri)).hexdigest()


def mismatch(faces: str, table: str, face_rows: int, table_rows: int, matched: int) -> str | None:
    """One line when a table keyed by sample_id (labels, pseudo-labels) and the face table ``faces`` do not name
    the same faces (``matched`` of them in both), with the counts; None when they do."""
    if matched == face_rows == table_rows:
        return None
    return (
        f"{table} does not fit the face table {faces}: {face_rows - matched} of {face_rows} faces have no row "
        f"in it and {table_rows - matched} of its {table_rows} rows name no face (tables of different ingests?)"
    )


def evaluate_only_datasets(faces: str) -> list[str]:
    """The datasets of a face table whose labels are for evaluation only (``use: evaluate`` at ingest)."""
    return json.loads(read_manifest(faces)["metadata"].get(EVALUATE_ONLY, "[]"))


def split_label_cells(labels: pa.Table, moved: dict[str, np.ndarray]) -> tuple[pa.Table, pa.Table]:
    """Move label cells out of ``labels``: ``moved`` maps a column to a row mask. Returns (labels without those
    cells, the moved cells), both in the label schema; the second holds only rows with a moved cell."""
    kept, taken = labels, labels
    any_moved = np.zeros(labels.num_rows, dtype=bool)
    for index, column in enumerate(labels.column_names):
        if column == "sample_id":
            continue
        mask = pa.array(moved.get(column, np.zeros(labels.num_rows, dtype=bool)))
        nulls = pa.nulls(labels.num_rows, labels.schema.field(column).type)
        kept = kept.set_column(index, column, pc.if_else(mask, nulls, labels.column(column)))
        taken = taken.set_column(index, column, pc.if_else(mask, labels.column(column), nulls))
        any_moved |= mask.to_numpy(zero_copy_only=False)
    return kept, taken.filter(pa.array(any_moved))


def training_labels(
    faces: str, labels: pa.Table, face_columns: pa.Table | None = None
) -> tuple[pa.Table, pa.Table | None]:
    """(the labels training may use, the evaluation-only labels or None): every label of a face of an
    evaluation-only dataset moves to the second table. ``face_columns``: the face table's sample_id and dataset
    columns when the caller has read them already."""
    datasets = evaluate_only_datasets(faces)
    if not datasets:
        return labels, None
    meta = face_columns if face_columns is not None else read_face_columns(faces, ["sample_id", "dataset"])
    hidden_ids = meta.filter(pc.is_in(meta.column("dataset"), pa.array(datasets, pa.string()))).column("sample_id")
    rows = pc.is_in(labels.column("sample_id"), hidden_ids.combine_chunks()).to_numpy(zero_copy_only=False)
    return split_label_cells(labels, dict.fromkeys(labels.column_names, rows))


# ---- the model card (layout.MODEL_CARD in every model folder, and inside exported files) ---------------------

MODEL_CARD_FORMAT = "d2mtl-model/1"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainingData(_Record):
    """Per split: per dataset its rows and labelled rows per task (``FaceIndex.summary``)."""

    train: dict[str, dict[str, int]]
    val: dict[str, dict[str, int]]
    test: dict[str, dict[str, int]]
    unmatched_labels: int  # label rows whose sample_id is not in the face table


class TrainingRecord(_Record):
    """How the model was trained."""

    config: dict  # the TrainConfig as JSON, as that d2mtl version shaped it
    data: TrainingData
    faces: dict[str, str]  # the face table's manifest metadata: IMAGE_SIZE, TEMPLATE, EVALUATE_ONLY where set
    inputs: dict[str, str]  # input name -> content_hash: a resume needs the same
    epochs: int
    peak_lr: float | None
    train_seconds: float
    processes: int | None = None  # data-parallel processes, under torchrun only


class Sources(_Record):
    """The URIs the model was trained from."""

    faces: str
    labels: str
    pseudo: str | None = None  # students
    teacher: str | None = None  # students: the teacher folder when init is teacher


class PseudoLabelUse(_Record):
    used: int  # pseudo-labels that trained the student
    ignored_ground_truth: int  # kept pseudo-labels not used because the ground truth has the label


class ExportInput(_Record):
    name: str
    dtype: str
    shape: list[str | int]
    preprocessing: str


class ExportRecord(_Record):
    """What a consumer of an exported file (d2mtl export, serve) needs to feed it and read it."""

    format: str
    file: str
    source: str
    torch: str
    opset: int | None
    input: ExportInput
    outputs: dict[str, list[str | int]]  # output name -> shape
    age_interval: float


class ModelCard(_Record):
    """The model card. The first fields are the architecture the network is rebuilt from (models.ModelSpec);
    the optional ones are absent from a model saved outside a training run and from a card before export."""

    format: Literal[MODEL_CARD_FORMAT]
    backbone: str
    tasks: list[str]
    age_head: Literal["dex", "l1"]
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dropout: float
    classes: dict[str, list[str]]  # per classification task its class names, in code order
    age_range: tuple[int, int]
    weights_sha256: str
    role: str | None = None  # teacher, student, baseline:<task>, student_single:<task>
    training: TrainingRecord | None = None
    metrics: dict[str, dict[str, float | int]] | None = None  # "val", "test": the final metrics
    sources: Sources | None = None
    pseudo_labels: dict[str, PseudoLabelUse] | None = None  # students: per task
    export: ExportRecord | None = None

    @property
    def face_size(self) -> int | None:
        """The side of the faces the model was trained on; None when its face table did not record it."""
        size = self.training.faces.get(IMAGE_SIZE) if self.training else None
        return int(size) if size else None

    def identity(self) -> dict:
        """What names the model in provenance records (pseudo-label metadata)."""
        role = {"role": self.role} if self.role is not None else {}
        return {
            **role,
            "backbone": self.backbone,
            "tasks": self.tasks,
            "age_head": self.age_head,
            "input_size": self.input_size,
            "weights_sha256": self.weights_sha256,
        }


def model_card_json(card: ModelCard) -> str:
    """The one writer of a card: validated again (``model_copy(update=...)`` skips validation); the fields a card
    does not have stay out of it."""
    fields = card.model_dump(mode="json", exclude_unset=True)
    return json.dumps(ModelCard.model_validate(fields).model_dump(mode="json", exclude_unset=True), indent=1)


def parse_model_card(text: str | bytes, where: str) -> ModelCard:
    """The one reader of a card (a model folder's file, an exported file's metadata): refuses another format
    and a card that does not follow this one, naming ``where``."""
    try:
        fields = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ContractError(f"{where}: not a JSON model card ({err})") from None
    found = fields.get("format") if isinstance(fields, dict) else None
    if found != MODEL_CARD_FORMAT:
        raise ContractError(
            f"{where}: model card format {found!r} is not supported (this d2mtl reads {MODEL_CARD_FORMAT!r}); "
            "retrain, or use the d2mtl version that wrote this model"
        )
    try:
        return ModelCard.model_validate(fields)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ContractError(f"{where}: not a valid {MODEL_CARD_FORMAT} model card ({problems})") from None


def read_model_card(model: str) -> ModelCard:
    """The card of the model folder ``model``."""
    if not store.is_remote(model) and Path(model).is_file():
        inside = Path(model).name in (layout.MODEL_CARD, layout.WEIGHTS_FILE)
        raise ContractError(
            f"{model} is a file; expected a model folder (holding {layout.MODEL_CARD} and "
            f"{layout.WEIGHTS_FILE})" + (f": {Path(model).parent}" if inside else "")
        )
    uri = store.join(model, layout.MODEL_CARD)
    try:
        text = store.read_text(uri)
    except FileNotFoundError:
        raise ContractError(
            f"{model}: no {layout.MODEL_CARD}; not a model folder (teacher/student/baseline output)"
        ) from None
    return parse_model_card(text, uri)
