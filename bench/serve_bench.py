"""Serving speed: ``d2mtl serve`` (KServe, v1 protocol over HTTP) against in-process ``Analyzer``, same images, one run.

In-process: ``Analyzer.analyze([image])`` per image (batch 1, what one request does), with the server's forward
pass (``--backend``). Served: a load generator made for this (asyncio + httpx) keeps C requests in flight (C = 1,
4, 16), one image per request, and times each from send to parsed answer. The sides take turns over ``--rounds``
rounds, so that load from other jobs hits them alike. Then a soak of ``--requests`` requests at C = 16 compares the
server's resident memory after warm-up with the end. Both sides use ``--threads`` torch threads; the client shares
the machine with the server.
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
from dataclasses import dataclass, field
from functools import partial
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


@dataclass
class Timings:
    """Request latencies, faces and busy wall time of one side, gathered over the rounds."""

    seconds: list[float] = field(default_factory=list)
    faces: int = 0
    wall: float = 0.0
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "requests": len(self.seconds) + len(self.errors),
            "errors": len(self.errors),
            "first_errors": self.errors[:3],
            **percentiles(self.seconds or [0.0]),
            "faces_per_s": round(self.faces / self.wall, 1) if self.wall else 0.0,
        }


def in_process(analyzer: Analyzer, images: list[bytes], first: int, calls: int, timings: Timings) -> None:
    """``calls`` images from number ``first`` on, one ``analyze`` each (batch 1)."""
    for i in range(first, first + calls):
        start = time.perf_counter()
        [result] = analyzer.analyze([images[i % len(images)]])
        timings.seconds.append(time.perf_counter() - start)
        timings.wall += timings.seconds[-1]
        timings.faces += len(result.faces)


async def load(url: str, bodies: list[bytes], concurrency: int, requests: int, timings: Timings) -> None:
    """``requests`` requests, ``concurrency`` in flight, each body in turn."""
    next_index = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < requests:
            body = bodies[next_index % len(bodies)]
            next_index += 1
            start = time.perf_counter()
            answer = await client.post(url, content=body, headers={"Content-Type": "application/json"})
            if answer.status_code != 200:
                timings.errors.append(f"{answer.status_code} {answer.text[:200]}")
                continue
            timings.faces += len(answer.json()["predictions"][0]["faces"])
            timings.seconds.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        timings.wall += time.perf_counter() - start


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
        runs = {
            "torch": partial(analyzer_graph, channels_last),
            "onnxruntime": lambda x=x: session.run(None, {export.INPUT_NAME: x.numpy()}),
        }
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
    analyzers = {
        backend: load_analyzer(model, device="cpu", ingest=cfg.ingest, backend=backend) for backend in ("torch", "onnx")
    }
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
    from conftest import free_port, start_d2mtl_serve  # the tests' way to start a server, shared

    torch.set_num_threads(args.threads)
    cfg = load_experiment(args.config)
    images = pick_images(Path(args.data_root), args.images)
    bodies = [
        json.dumps({"instances": [{"image_bytes": {"b64": base64.b64encode(image).decode()}}]}).encode()
        for image in images
    ]
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        work = Path(tmp)
        model = args.model
        if model is None:
            model = str(work / "student")
            save_model(
                MultiTaskNet(ModelSpec.from_config(cfg.student.model, cfg.student.task_names), weights=None), model
            )
        report: dict = {
            "images": len(images),
            "threads": args.threads,
            "cpus": os.cpu_count(),
            "backend": args.backend,
            "model": args.model or f"untrained {cfg.student.model.backbone} {cfg.student.model.input_size} px",
        }
        analyzer = load_analyzer(model, device="cpu", ingest=cfg.ingest, backend=args.backend)
        analyzer.analyze(images[:3])
        port = free_port()
        server = start_d2mtl_serve(
            [
                "--model",
                model,
                "--name",
                NAME,
                "--device",
                "cpu",
                "--threads",
                str(args.threads),
                "--backend",
                args.backend,
            ],
            port,
            work / "server.log",
        )
        url = f"http://127.0.0.1:{port}/v1/models/{NAME}:predict"
        try:
            asyncio.run(load(url, bodies, 4, 50, Timings()))  # warm-up
            rss_start = resident_mb(server.pid)
            local, served = Timings(), {c: Timings() for c in LEVELS}
            for round_number in range(args.rounds):  # in turn, so that other jobs' load hits every side alike
                in_process(analyzer, images, round_number * args.calls // args.rounds, args.calls // args.rounds, local)
                for c in LEVELS:
                    asyncio.run(load(url, bodies, c, args.per_level // args.rounds, served[c]))
            soak = Timings()
            asyncio.run(load(url, bodies, LEVELS[-1], args.requests, soak))
            report["in_process"] = local.summary()
            report["served"] = [{"concurrency": c, **served[c].summary()} for c in LEVELS]
            report["soak"] = {
                "concurrency": LEVELS[-1],
                **soak.summary(),
                "rss_after_warmup_mb": round(rss_start, 1),
                "rss_end_mb": round(resident_mb(server.pid), 1),
            }
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
    parser.add_argument(
        "--data-root", default=str(REPO.parent / "shared" / "data"), help="holds utkface/*.jpg (default ../shared/data)"
    )
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
    parser.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="rounds taking turns over the sides, each with 1/rounds of the requests (default 4)",
    )
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
