"""Predict speed on CPU: one multi-task pass against four single-task models run back to back (the deepface way).

Both sides start from the same aligned faces (detection and alignment are timed separately, per image) and give
the same four answers (age with its interval, gender, race, expression) through ``predict.Analyzer``: the
multi-task model once, or each single-task model of the same architecture in turn, each preprocessing the face
itself as separate attribute models do. Measured per face at batch 1 (one face per call, as a per-face loop
runs) and batched (``--batch-size`` faces per pass). Each chunk of faces goes through both sides in turn and
the speed-up is the median ratio of such back-to-back pairs, so load from other processes hits both alike.

Goals (issue 8): the multi-task pass >= 3.5x faster per face than the four single-task models; per face at
batch 1 below the 7.75 ms the offline tools take here for three answers, and batched at least 5x below that.
Untrained weights (weights none): speed does not depend on them.

    .venv/bin/python bench/predict_bench.py --data-root ../shared/data          # real UTKFace + FER2013 faces
    .venv/bin/python bench/predict_bench.py --faces 64 --rounds 3               # generated faces, quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from d2mtl import faces
from d2mtl.config.train import ModelConfig
from d2mtl.models import ModelSpec, MultiTaskNet, save_model
from d2mtl.predict import Analyzer
from d2mtl.tasks import TASKS

OFFLINE_TOOLS_MS = 7.75  # per face at batch 1, three answers from two models (issue 8), detection not counted
SPEEDUP_GOAL = 3.5
BATCHED_GOAL = 5.0  # batched per-face time at least this many times below OFFLINE_TOOLS_MS


def real_images(data_root: Path, count: int) -> list[bytes]:
    """Half UTKFace (200 px colour), half FER2013 (48 px grey), spread over each dataset's files."""
    picked = []
    for pattern, share in (("utkface/*.jpg", count - count // 2), ("fer2013/test/*/*.jpg", count // 2)):
        files = sorted(data_root.glob(pattern))
        if not files:
            raise SystemExit(f"no {pattern} under {data_root}")
        picked += [files[i].read_bytes() for i in np.linspace(0, len(files) - 1, share).astype(int)]
    return picked


def generated_faces(count: int, size: int, seed: int = 0) -> list[bytes]:
    """Aligned-face-sized random JPEGs: the network's cost does not depend on the content."""
    rng = np.random.default_rng(seed)
    return [faces.encode_jpeg(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), 95) for _ in range(count)]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def build_models(work: Path, backbone: str, input_size: int) -> tuple[str, list[str]]:
    """The multi-task model folder and one single-task folder per task, same architecture."""
    torch.manual_seed(0)
    multi = str(work / "multi")
    save_model(
        MultiTaskNet(
            ModelSpec.from_config(ModelConfig(backbone=backbone, input_size=input_size), tuple(TASKS)), weights=None
        ),
        multi,
    )
    singles = []
    for task in TASKS:
        singles.append(str(work / f"single_{task}"))
        save_model(
            MultiTaskNet(
                ModelSpec.from_config(ModelConfig(backbone=backbone, input_size=input_size), (task,)), weights=None
            ),
            singles[-1],
        )
    return multi, singles


def compare(multi: Analyzer, singles: list[Analyzer], jpegs: list[bytes], batch_size: int, rounds: int) -> dict:
    """Per-face milliseconds of each side and the speed-up, from chunks of ``batch_size`` faces timed in turn.

    Each chunk goes through the multi-task model, then through the four single-task models one after the other
    (as a per-face loop over attribute models does); medians over chunks and rounds."""
    chunks = [jpegs[start : start + batch_size] for start in range(0, len(jpegs), batch_size)]
    multi.predict_faces(chunks[0]), [single.predict_faces(chunks[0]) for single in singles]  # warm-up
    multi_ms, singles_ms, ratios = [], [], []
    for _ in range(rounds):
        for chunk in chunks:
            one = timed(partial(multi.predict_faces, chunk))
            four = timed(lambda chunk=chunk: [single.predict_faces(chunk) for single in singles])
            multi_ms.append(1000 * one / len(chunk))
            singles_ms.append(1000 * four / len(chunk))
            ratios.append(four / one)
    return {
        "batch_size": batch_size,
        "faces": len(jpegs),
        "rounds": rounds,
        "multi_ms_per_face": statistics.median(multi_ms),
        "singles_ms_per_face": statistics.median(singles_ms),
        "multi_ms_fastest": min(multi_ms),
        "singles_ms_fastest": min(singles_ms),
        "speedup": statistics.median(ratios),
    }


def detection_ms(analyzer: Analyzer, images: list[bytes]) -> dict:
    """Decode + detect + align per image (not part of the comparison)."""
    analyzer.locate(images[0])
    found, seconds = 0, 0.0
    for number, image in enumerate(images):
        start = time.perf_counter()
        located = analyzer.locate(image, number)
        seconds += time.perf_counter() - start
        found += len(located.jpegs)
    return {"images": len(images), "faces": found, "ms_per_image": 1000 * seconds / len(images)}


def markdown(result: dict) -> str:
    rows = [
        "| faces per pass | multi-task ms/face: median (fastest) | 4 single-task ms/face: median (fastest) | "
        "speed-up (goal >= 3.5x) |",
        "|---|---|---|---|",
    ]
    rows += [
        f"| {run['batch_size']} | {run['multi_ms_per_face']:.2f} ({run['multi_ms_fastest']:.2f}) | "
        f"{run['singles_ms_per_face']:.2f} ({run['singles_ms_fastest']:.2f}) | {run['speedup']:.2f}x |"
        for run in result["runs"]
    ]
    one, batched = result["runs"]
    lines = [
        f"Command: `{result['command']}`",
        "",
        f"{result['backbone']} {result['input_size']} px, {result['threads']} torch thread(s), "
        f"{result['faces_source']}, {one['rounds']} rounds, medians over chunks timed back to back.",
        "",
        *rows,
        "",
        f"- batch 1: {one['multi_ms_per_face']:.2f} ms per face for four answers "
        f"(offline tools: {OFFLINE_TOOLS_MS} ms for three) -> "
        f"{'met' if one['multi_ms_per_face'] < OFFLINE_TOOLS_MS else 'NOT met'}",
        f"- batched: {batched['multi_ms_per_face']:.2f} ms per face, "
        f"{OFFLINE_TOOLS_MS / batched['multi_ms_per_face']:.1f}x below the offline tools (goal >= {BATCHED_GOAL}x)"
        f" -> {'met' if OFFLINE_TOOLS_MS / batched['multi_ms_per_face'] >= BATCHED_GOAL else 'NOT met'}",
        f"- speed-up over four single-task models: {one['speedup']:.2f}x at batch 1, "
        f"{batched['speedup']:.2f}x batched (goal >= {SPEEDUP_GOAL}x) -> "
        f"{'met' if min(one['speedup'], batched['speedup']) >= SPEEDUP_GOAL else 'NOT met'}",
    ]
    if "detection" in result:
        det = result["detection"]
        lines.append(
            f"- detection + alignment (not counted above): {det['ms_per_image']:.1f} ms per image "
            f"({det['faces']} faces in {det['images']} images)"
        )
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, help="folder with utkface/ and fer2013/: detect real faces")
    parser.add_argument("--faces", type=int, default=128, help="faces (real: images) to measure (default 128)")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--input-size", type=int, default=64, help="network input side (default 64, the profiles')")
    parser.add_argument("--batch-size", type=int, default=64, help="faces per pass of the batched run (default 64)")
    parser.add_argument("--rounds", type=int, default=3, help="passes over the faces (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch / detector threads (default 2)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="predict-bench-") as work:
        multi_dir, single_dirs = build_models(Path(work), args.backbone, args.input_size)
        multi = Analyzer(multi_dir, device="cpu", batch_size=args.batch_size)
        singles = [Analyzer(d, device="cpu", batch_size=args.batch_size) for d in single_dirs]
        result = {
            "backbone": args.backbone,
            "input_size": args.input_size,
            "threads": args.threads,
            "command": "python bench/predict_bench.py "
            + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "json"),
        }
        if args.data_root:
            images = real_images(args.data_root, args.faces)
            result["detection"] = detection_ms(multi, images)
            jpegs = [jpeg for image in images for jpeg in multi.locate(image).jpegs]
            result["faces_source"] = f"{len(jpegs)} real faces detected in UTKFace + FER2013 images"
        else:
            jpegs = generated_faces(args.faces, multi.face_size)
            result["faces_source"] = f"{len(jpegs)} generated {multi.face_size} px aligned-face JPEGs"
        result["runs"] = [
            compare(multi, singles, jpegs, 1, args.rounds),
            compare(multi, singles, jpegs, args.batch_size, args.rounds),
        ]
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
