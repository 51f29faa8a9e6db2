"""Ingest output written directly: a face table and a label table, for the stages after ingest."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa

from d2mtl import contracts


def make_tiny_tables(
    root: Path, per_dataset: int = 24, image_size: int = 32, seed: int = 0, evaluate_only: tuple[str, ...] = ()
) -> dict[str, str]:
    """Two datasets with disjoint labels, like UTKFace (age, gender, race) and FER2013 (expression); the
    datasets named in ``evaluate_only`` are marked so in the face manifest, as ``use: evaluate`` does.

    Images are random but carry a learnable signal: the mean brightness encodes the labels.
    Returns {"faces": uri, "labels": uri}.
    """
    rng = np.random.default_rng(seed)
    faces_uri, labels_uri = str(root / "faces"), str(root / "labels.parquet")
    writer = contracts.FaceTableWriter(
        faces_uri,
        shard_rows=max(8, per_dataset // 2),
        metadata={"image_size": str(image_size), contracts.EVALUATE_ONLY: json.dumps(list(evaluate_only))},
    )
    label_rows = []
    splits = ["train"] * 6 + ["val", "test"]
    for dataset, domain in (("utk", "color"), ("fer", "gray")):
        for i in range(per_dataset):
            sample_id = f"{dataset}-{i:04d}"
            label = {
                "sample_id": sample_id,
                "age": None,
                "gender": None,
                "race": None,
                "expression": None,
                "age_low": None,
                "age_high": None,
            }
            if dataset == "utk":
                label.update(
                    age=float(rng.integers(1, 90)), gender=int(rng.integers(0, 2)), race=int(rng.integers(0, 5))
                )
                level = 40 + 150 * label["gender"]
            else:
                label.update(expression=int(rng.integers(0, 7)))
                level = 30 + 28 * label["expression"]
            image = np.clip(rng.normal(level, 20, (image_size, image_size, 3)), 0, 255).astype(np.uint8)
            if domain == "gray":
                image[:] = image.mean(axis=2, keepdims=True).astype(np.uint8)
            ok, encoded = cv2.imencode(".jpg", image[:, :, ::-1])
            assert ok
            writer.write(
                {
                    "sample_id": sample_id,
                    "dataset": dataset,
                    "domain": domain,
                    "split": splits[i % len(splits)],
                    "subject": None,
                    "image": encoded.tobytes(),
                    "source_uri": f"generated://{dataset}/{i}",
                    "det_score": None,
                    "box": None,
                    "landmarks": None,
                    "alignment": "trusted_crop",
                }
            )
            label_rows.append(label)
    writer.close()
    contracts.write_table(pa.Table.from_pylist(label_rows), labels_uri, contracts.LABELS)
    return {"faces": faces_uri, "labels": labels_uri}


def write_pseudo_table(tables: dict[str, str], uri: str) -> None:
    """The expression pseudo-label 'happy' (p 0.6) kept on every face: the student's extra labels."""
    faces = contracts.read_face_columns(tables["faces"], ["sample_id", "dataset"])
    probs = np.full(7, 0.4 / 6, np.float32)
    probs[3] = 0.6
    rows = [
        {
            "sample_id": sid,
            "dataset": ds,
            "expression": 3,
            "expression_confidence": 0.6,
            "expression_probs": probs.tolist(),
            "expression_kept": True,
        }
        for sid, ds in zip(faces.column("sample_id").to_pylist(), faces.column("dataset").to_pylist(), strict=True)
    ]
    contracts.write_table(pa.Table.from_pylist(rows, schema=contracts.PSEUDO_SCHEMA), uri, contracts.PSEUDO)
