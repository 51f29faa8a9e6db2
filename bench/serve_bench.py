"""Serving speed: ``d2mtl serve`` (KServe, v1 protocol over HTTP) against in-process ``Analyzer``, same images, one run.

In-process: ``Analyzer.analyze([image])`` per image (batch 1, what one request does), with the server's forward
pass (``--backend``). Served: a load generator made
for this (asyncio + httpx) keeps C requests in flight (C = 1, 4, 16), one image per request, and times each from
send to parsed answer; then a soak of ``--requests`` requests at C = 16 compares the server's resident memory after
warm-up with the end. Both sides use ``--threads`` torch threads; the client shares the machine with the server.
The forward pass alone is also timed in torch and in onnxruntime (the ONNX export), batch 1 and ``--batch-size``,
and whole in-process requests with each, in alternating rounds, to say which the CPU path should run.

Goals (issue 15): p50 at C = 1 within 1.5x of in-process batch 1 (plus a few ms of HTTP); no error and no memory
growth over the soak; faces/s at C = 16 not below C = 1. Untrained weights of the student architecture of
``--config`` unless ``--model`` is given: speed does not depend on them.

    .venv/bin/python bench/serve_bench.py --data-root ../shared/data --requests 2000
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from d2mtl.config import load_experiment
from d2mtl.models import ModelSpec, MultiTaskNet, save_model
from d2mtl.predict import Analyzer
from d2mtl.serve import load_analyzer

REPO = Path(__file__).resolve().parents[1]
NAME = "d2mtl"
LEVELS = (1, 4, 16)
P50_GOAL = 1.5


def percentiles(seconds: list[float]) -> dict[str, float]:
    q = np.percentile(np.asarray(seconds) * 1000, [50, 95, 99])
    return {"p50_ms": round(q[0], 2), "p95_ms": round(q[1], 2), "p99_ms": round(q[2], 2)}


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def pick_images(data_root: Path, count: int) -> list[bytes]:
    files = sorted((data_root / "utkface").glob("*.jpg"))
    if not files:
        raise SystemExit(f"no utkface/*.jpg under {data_root}: pass --data-root")
    return [files[i].read_bytes() for i in np.linspace(0, len(files) - 1, count).astype(int)]


def in_process(analyzer: Analyzer, images: list[bytes], calls: int) -> dict:
    for image in images[:3]:
        analyzer.analyze([image])
    seconds, faces = [], 0
    for i in range(calls):
        start = time.perf_counter()
        [result] = analyzer.analyze([images[i % len(images)]])
        seconds.append(time.perf_counter() - start)
        faces += len(result.faces)
    return {"requests": calls, **percentiles(seconds), "faces_per_s": round(faces / sum(seconds), 1)}


async def load(url: str, bodies: list[bytes], concurrency: int, requests: int) -> dict:
    """``requests`` requests, ``concurrency`` in flight, each body in turn."""
    seconds, faces, errors = [], 0, []
    next_index = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal next_index, faces
        while next_index < requests:
            body = bodies[next_index % len(bodies)]
            next_index += 1
            start = time.perf_counter()
            answer = await client.post(url, content=body, headers={"Content-Type": "application/json"})
            if answer.status_code != 200:
                errors.append(f"{answer.status_code} {answer.text[:200]}")
                continue
            faces += len(answer.json()["predictions"][0]["faces"])
            seconds.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"concurrency": concurrency, "requests": requests, "errors": len(errors), "first_errors": errors[:3],
            **percentiles(seconds or [0.0]), "faces_per_s": round(faces / wall, 1)}


def forward_backends(model: str, work: Path, batch_size: int, calls: int) -> dict:
    """Median ms of one forward pass: torch (as Analyzer runs it) and onnxruntime over the ONNX export."""
    import onnxruntime as ort

    from d2mtl import export

    analyzer_graph = Analyzer(model, device="cpu").graph
    export.export_model(model, "onnx", str(work / "onnx"))
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(work / "onnx" / "model.onnx"), options, providers=["CPUExecutionProvider"])
    size = analyzer_graph.net.spec.input_size
    results = {}
    for batch in (1, batch_size):
        x = torch.randn(batch, 3, size, size)
        channels_last = x.contiguous(memory_format=torch.channels_last)
        runs = {"torch": lambda: analyzer_graph(channels_last),
                "onnxruntime": lambda: session.run(None, {export.INPUT_NAME: x.numpy()})}
        with torch.inference_mode():
            for name, run in runs.items():
                run()
                seconds = []
                for _ in range(calls):
                    start = time.perf_counter()
                    run()
                    seconds.append(time.perf_counter() - start)
                results[f"{name}_batch{batch}_ms"] = round(statistics.median(seconds) * 1000, 3)
    return results


def backends_in_process(model: str, cfg, images: list[bytes], rounds: int) -> dict:
    """Whole-request latency in process with each forward-pass backend, in alternating rounds over the images."""
    analyzers = {backend: load_analyzer(model, device="cpu", ingest=cfg.ingest, backend=backend)
                 for backend in ("torch", "onnx")}
    seconds: dict[str, list[float]] = {backend: [] for backend in analyzers}
    for analyzer in analyzers.values():
        analyzer.analyze(images[:3])
    for _ in range(rounds):
        for backend, analyzer in analyzers.items():
            for image in images:
                start = time.perf_counter()
                analyzer.analyze([image])
                seconds[backend].append(time.perf_counter() - start)
    return {backend: {"requests": len(values), **percentiles(values)} for backend, values in seconds.items()}


def main(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import _free_port, start_d2mtl_serve  # the tests' way to start a server, shared

    torch.set_num_threads(args.threads)
    cfg = load_experiment(args.config)
    images = pick_images(Path(args.data_root), args.images)
    bodies = [json.dumps({"instances": [{"image_bytes": {"b64": base64.b64encode(image).decode()}}]}).encode()
              for image in images]
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        work = Path(tmp)
        model = args.model
        if model is None:
            model = str(work / "student")
            save_model(MultiTaskNet(ModelSpec.from_config(cfg.student), weights=None), model)
        report: dict = {"images": len(images), "threads": args.threads, "cpus": os.cpu_count(), "backend": args.backend,
                        "model": args.model or f"untrained {cfg.student.backbone} {cfg.student.input_size} px"}
        analyzer = load_analyzer(model, device="cpu", ingest=cfg.ingest, backend=args.backend)
        report["in_process"] = in_process(analyzer, images, args.calls)
        port = _free_port()
        server = start_d2mtl_serve(["--model", model, "--name", NAME, "--device", "cpu", "--threads",
                                    str(args.threads), "--backend", args.backend], port, work / "server.log")
        url = f"http://127.0.0.1:{port}/v1/models/{NAME}:predict"
        try:
            asyncio.run(load(url, bodies, 4, 50))  # warm-up
            rss_start = resident_mb(server.pid)
            report["served"] = [asyncio.run(load(url, bodies, c, args.per_level)) for c in LEVELS]
            soak = asyncio.run(load(url, bodies, LEVELS[-1], args.requests))
            report["soak"] = {**soak, "rss_after_warmup_mb": round(rss_start, 1),
                              "rss_end_mb": round(resident_mb(server.pid), 1)}
        finally:
            server.terminate()
            server.wait(timeout=60)
        if not args.no_onnx:
            report["forward"] = forward_backends(model, work, args.batch_size, args.forward_calls)
            report["request_by_backend"] = backends_in_process(model, cfg, images, args.rounds)
    single = report["served"][0]
    report["goals"] = {
        "p50_c1_over_in_process": round(single["p50_ms"] / report["in_process"]["p50_ms"], 3),
        "http_overhead_p50_ms": round(single["p50_ms"] - report["in_process"]["p50_ms"], 2),
        "no_errors": sum(r["errors"] for r in report["served"]) + report["soak"]["errors"] == 0,
        "rss_growth_mb": round(report["soak"]["rss_end_mb"] - report["soak"]["rss_after_warmup_mb"], 1),
        "faces_per_s_c16_over_c1": round(report["served"][-1]["faces_per_s"] / single["faces_per_s"], 3),
    }
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"),
                        help="holds utkface/*.jpg (default ../shared/data)")
    parser.add_argument("--model", default=None, help="a model folder (default: untrained, --config's student)")
    parser.add_argument("--config", default=None, help="experiment profile for the architecture and ingest settings")
    parser.add_argument("--images", type=int, default=32, help="distinct UTKFace images, cycled (default 32)")
    parser.add_argument("--calls", type=int, default=300, help="in-process batch-1 calls (default 300)")
    parser.add_argument("--per-level", type=int, default=300, help="requests per concurrency level (default 300)")
    parser.add_argument("--requests", type=int, default=2000, help="requests of the memory soak at C=16 (default 2000)")
    parser.add_argument("--backend", default="auto", help="forward pass of both sides: auto (onnx on CPU), torch, onnx")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on each side (default 2)")
    parser.add_argument("--batch-size", type=int, default=16, help="batch of the forward-pass comparison (default 16)")
    parser.add_argument("--forward-calls", type=int, default=200, help="timed forward passes per backend and batch")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the in-process backend comparison")
    parser.add_argument("--no-onnx", action="store_true", help="skip the torch / onnxruntime comparisons")
    parser.add_argument("--out", default=None, help="also write the report as JSON here")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    result = main(arguments)
    text = json.dumps(result, indent=1)
    if arguments.out:
        Path(arguments.out).write_text(text + "\n")
    print(text)
