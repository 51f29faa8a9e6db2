"""Regenerate the image lock files in docker/requirements/; run it after changing pyproject.toml.

    pip install uv && python docker/lock.py

Every lock pins every package exactly, resolved for the images' platform (Linux x86_64, CPython 3.11):

    train-cuda.txt   all runtime dependencies of pyproject.toml (PyPI's torch wheels are the CUDA build)
    train-cpu.txt    the same pins less torch, torchvision and the CUDA runtime that only they pull in
    torch-cpu.txt    torch and torchvision at the same versions from PyTorch's CPU-only index
    serve.txt        the serve extra (kserve) on top, constrained to train-cuda.txt (but SERVE_OWN_VERSIONS),
                     less the CUDA runtime: the serve image installs it with torch-cpu.txt
    ingest.txt       ingest.in, constrained to train-cuda.txt: the same versions, no torch
    build.txt        the build backends (the project wheel, sdist-only dependencies such as kfp-server-api)

The CPU locks are derived from the CUDA lock rather than resolved against PyTorch's index, so the two
training variants cannot drift apart; tests/test_containers.py checks that they still match.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = Path("docker/requirements")  # relative to REPO, so the locks carry no absolute paths
PYTHON_VERSION = "3.11"
PYTHON_PLATFORM = "x86_64-manylinux_2_28"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TORCH_PACKAGES = ("torch", "torchvision")
CUDA_ONLY = re.compile(r"^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")
REGENERATE = "python docker/lock.py"
SERVE_OWN_VERSIONS = ("python-dateutil",)  # kserve 0.21 needs python-dateutil < 3; train-cuda.txt has 4.0


def compile_lock(source: str, out: str, constraints: str | None = None, extras: tuple[str, ...] = ()) -> None:
    """Resolve ``source`` (a pyproject.toml or an .in file, with ``extras``) into the lock ``out`` with uv."""
    try:
        from uv import find_uv_bin
    except ImportError:
        sys.exit("docker/lock.py needs uv: pip install uv")
    command = [
        find_uv_bin(),
        "pip",
        "compile",
        source,
        "--output-file",
        out,
        "--quiet",
        "--python-version",
        PYTHON_VERSION,
        "--python-platform",
        PYTHON_PLATFORM,
        "--annotation-style",
        "line",
        "--custom-compile-command",
        REGENERATE,
    ]
    if constraints:
        command += ["--constraint", constraints]
    for extra in extras:
        command += ["--extra", extra]
    subprocess.run(command, cwd=REPO, check=True)


def pins(lock_text: str) -> dict[str, str]:
    """``{name: version}`` of every ``name==version`` line of a lock."""
    return {m.group(1).lower(): m.group(2) for m in map(PIN.match, lock_text.splitlines()) if m}


def without_cuda(lock: str, header: str) -> str:
    """A lock's pins less torch, torchvision and the CUDA runtime, under a one-line ``header`` comment."""
    kept = [line for line in lock.splitlines() if not CUDA_ONLY.match(line) and not line.startswith("#")]
    return "\n".join([f"# {header} Regenerate: {REGENERATE}", *kept]) + "\n"


def cpu_locks(cuda_lock: str) -> tuple[str, str]:
    """(train-cpu.txt, torch-cpu.txt) derived from the text of train-cuda.txt."""
    versions = pins(cuda_lock)
    missing = [name for name in TORCH_PACKAGES if name not in versions]
    if missing:
        raise ValueError(f"train-cuda.txt pins no {', '.join(missing)}")
    train_cpu = without_cuda(cuda_lock, "train-cuda.txt less torch, torchvision and their CUDA runtime.")
    torch_cpu = (
        "\n".join(
            [
                "# torch and torchvision from PyTorch's CPU index at train-cuda.txt's versions. "
                f"Regenerate: {REGENERATE}",
                f"--index-url {TORCH_CPU_INDEX}",
                *(f"{name}=={versions[name].split('+')[0]}+cpu" for name in TORCH_PACKAGES),
            ]
        )
        + "\n"
    )
    return train_cpu, torch_cpu


def serve_lock(cuda: str) -> str:
    """serve.txt: pyproject.toml with the serve extra, resolved at the versions of the lock ``cuda`` (except
    SERVE_OWN_VERSIONS), less the CUDA runtime."""
    training = pins((REPO / cuda).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        constraints, lock = Path(tmp, "constraints.txt"), Path(tmp, "serve-cuda.txt")
        constraints.write_text(
            "".join(f"{name}=={version}\n" for name, version in training.items() if name not in SERVE_OWN_VERSIONS)
        )
        compile_lock("pyproject.toml", str(lock), constraints=str(constraints), extras=("serve",))
        text = lock.read_text().replace(str(constraints), cuda)
    return without_cuda(text, "train-cuda.txt with the serve extra (kserve), less the CUDA runtime.")


def main() -> None:
    cuda = str(REQUIREMENTS / "train-cuda.txt")
    compile_lock("pyproject.toml", cuda)
    compile_lock(str(REQUIREMENTS / "ingest.in"), str(REQUIREMENTS / "ingest.txt"), constraints=cuda)
    compile_lock(str(REQUIREMENTS / "build.in"), str(REQUIREMENTS / "build.txt"), constraints=cuda)
    train_cpu, torch_cpu = cpu_locks((REPO / cuda).read_text())
    (REPO / REQUIREMENTS / "train-cpu.txt").write_text(train_cpu)
    (REPO / REQUIREMENTS / "torch-cpu.txt").write_text(torch_cpu)
    (REPO / REQUIREMENTS / "serve.txt").write_text(serve_lock(cuda))
    print(f"wrote {REQUIREMENTS}/{{train-cuda,train-cpu,torch-cpu,ingest,build,serve}}.txt")


if __name__ == "__main__":
    main()
