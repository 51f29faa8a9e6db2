"""The ingest's per-image work: decode, detect, align and encode in worker processes, results in input order.

Workers are started with ``spawn`` (no inherited threads or locks from the caller), so a script that runs the
ingest with more than one worker needs the usual ``if __name__ == "__main__":`` guard. What a worker runs is
in this module, apart from the stage's flow: a spawned worker imports only what the per-image work needs.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.pool
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from d2mtl.config.ingest import IngestConfig
from d2mtl.faces import FaceDetector, UnreadableImage, align, center_crop_resize, decode_rgb, encode_jpeg
from d2mtl.sources import Payload, Rejected


@dataclass(frozen=True)
class AlignedFace:
    image: bytes
    alignment: str  # aligned | trusted_crop
    det_score: float | None = None
    box: list[float] | None = None
    landmarks: list[float] | None = None


class FaceAligner:
    """Decode, detect, align and encode one payload; one per worker process."""

    def __init__(self, cfg: IngestConfig):
        import cv2

        cv2.setNumThreads(1)
        self.size, self.quality = cfg.image_size, cfg.jpeg_quality
        self.detector = FaceDetector(cfg.detector, threads=1)

    def __call__(self, payload: Payload, policy: str) -> AlignedFace | Rejected:
        if isinstance(payload, Rejected):
            return payload
        try:
            rgb = decode_rgb(payload) if isinstance(payload, bytes) else np.stack([payload] * 3, axis=-1)
        except UnreadableImage as err:
            return Rejected(err.reason, str(err))
        reason = f"no face with score >= {self.detector.min_score}"
        if policy != "trust_crop":
            face = self.detector.main_face(rgb)
            if face is not None:
                try:
                    aligned = align(rgb, face.landmarks, self.size)
                    return AlignedFace(
                        encode_jpeg(aligned, self.quality),
                        "aligned",
                        face.score,
                        face.box.tolist(),
                        face.landmarks.reshape(-1).tolist(),
                    )
                except ValueError as err:
                    reason = str(err)
            if policy == "detect":
                return Rejected("no_face", reason)
        return AlignedFace(encode_jpeg(center_crop_resize(rgb, self.size), self.quality), "trusted_crop")


_aligner: FaceAligner | None = None  # this worker process's aligner (multiprocessing initializer)


def _init_worker(cfg_json: str) -> None:
    global _aligner
    _aligner = FaceAligner(IngestConfig.model_validate_json(cfg_json))


def _work(job: tuple[int, Payload, str]) -> tuple[int, AlignedFace | Rejected]:
    slot, payload, policy = job
    return slot, _aligner(payload, policy)


@contextlib.contextmanager
def worker_pool(cfg: IngestConfig, workers: int) -> Iterator[multiprocessing.pool.Pool | None]:
    """``workers`` processes, each with its aligner (None: work in this process). Started before the
    datasets are listed, so their start-up overlaps the listing."""
    if workers == 1:
        _init_worker(cfg.model_dump_json())
        yield None
        return
    pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (cfg.model_dump_json(),))
    try:
        yield pool
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def ordered_parallel(
    jobs: Iterable, pool: multiprocessing.pool.Pool | None, in_flight: int, chunk_size: int
) -> Iterator:
    """``_work`` over ``jobs`` in order, with at most ``in_flight`` jobs read ahead.

    Pool.imap alone would read the whole input ahead (all image bytes in memory); a semaphore,
    released as results are consumed, bounds the read-ahead.
    """
    if pool is None:
        yield from map(_work, jobs)
        return
    window = threading.Semaphore(in_flight)
    stop = threading.Event()

    def gated() -> Iterator:
        for job in jobs:
            while not window.acquire(timeout=0.5):
                if stop.is_set():
                    return
            yield job

    try:
        for result in pool.imap(_work, gated(), chunksize=chunk_size):
            window.release()
            yield result
    finally:
        stop.set()


def worker_count(cfg: IngestConfig) -> int:
    return cfg.workers or len(os.sched_getaffinity(0))
