"""d2mtl serve: the real KServe model server on loopback, real HTTP requests, answers against in-process Analyzer."""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import REPO, free_port, start_d2mtl_serve
from PIL import Image

from d2mtl import store
from d2mtl.config import load_experiment
from d2mtl.predict import Analyzer, ImageResult

pytest.importorskip("kserve", reason="d2mtl serve needs the serve extra: pip install -e '.[serve]'")

NAME = "faces"
LIMIT_MB = 4
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


http = httpx.Client(timeout=120)  # a slow answer under load is not a failure here; a wrong one is


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def noise(seed: int, shape=(120, 160, 3)) -> bytes:
    return png(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


def start_server(model: str, port: int, log: Path, env: dict | None = None, backend: str = "auto") -> subprocess.Popen:
    """The server under test: ``d2mtl serve`` of ``model`` on loopback ``port``, once it is ready."""
    try:
        return start_d2mtl_serve(
            [
                "--model",
                model,
                "--name",
                NAME,
                "--device",
                "cpu",
                "--max-request-mb",
                str(LIMIT_MB),
                "--backend",
                backend,
            ],
            port,
            log,
            env,
        )
    except RuntimeError as err:
        pytest.fail(str(err))


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    port = free_port()
    process = start_server(model_dir, port, tmp_path_factory.mktemp("serve") / "server.log")
    yield f"http://127.0.0.1:{port}"
    stop_server(process)


@pytest.fixture(scope="module")
def analyzer(model_dir) -> Analyzer:
    """In-process analysis with the server's settings (the packaged cpu profile's ingest section)."""
    return Analyzer(model_dir, device="cpu", ingest=load_experiment().ingest)


@pytest.fixture(scope="module")
def photos(face_photos) -> list[bytes]:
    return [path.read_bytes() for path in face_photos]


def v1(server: str, images: list[bytes]) -> httpx.Response:
    body = {"instances": [{"image_bytes": {"b64": b64(image)}} for image in images]}
    return http.post(f"{server}/v1/models/{NAME}:predict", json=body)


def v2(server: str, images: list[bytes]) -> httpx.Response:
    body = {
        "id": "request-1",
        "inputs": [
            {"name": "image", "shape": [len(images)], "datatype": "BYTES", "data": [b64(image) for image in images]}
        ],
    }
    return http.post(f"{server}/v2/models/{NAME}/infer", json=body)


def assert_same(served: dict, expected: ImageResult) -> None:
    """A served image result is the in-process one: same shape, classes, boxes; probabilities within 1e-4."""
    assert served.keys() == expected.model_dump().keys()
    assert (served["status"], served["width"], served["height"], served["reason"]) == (
        expected.status,
        expected.width,
        expected.height,
        expected.reason,
    )
    assert len(served["faces"]) == len(expected.faces)
    for face, truth in zip(served["faces"], expected.faces, strict=True):
        assert face["box"] == pytest.approx(list(truth.box), abs=0.01)
        assert face["age"]["years"] == pytest.approx(truth.age.years, abs=0.01)
        assert (face["age"]["low"], face["age"]["high"]) == (truth.age.low, truth.age.high)
        for task, estimate in truth.classes.items():
            assert face["classes"][task]["label"] == estimate.label
            assert list(face["classes"][task]["probabilities"]) == list(estimate.probabilities)
            assert list(face["classes"][task]["probabilities"].values()) == pytest.approx(
                list(estimate.probabilities.values()), abs=1e-4
            )


def assert_still_serving(server: str, photo: bytes) -> None:
    answer = v1(server, [photo])
    assert answer.status_code == 200 and answer.json()["predictions"][0]["status"] == "ok"


# ---- answers ---------------------------------------------------------------------------------------


def test_v1_answers_are_the_in_process_analysis(server, analyzer, photos):
    images = [*photos, noise(0)]
    answer = v1(server, images)
    assert answer.status_code == 200, answer.text
    predictions = answer.json()["predictions"]
    assert len(predictions) == len(images)
    for served, expected in zip(predictions, analyzer.analyze(images), strict=True):
        assert_same(served, expected)
    assert [p["status"] for p in predictions] == ["ok"] * len(photos) + ["no_face"]
    assert all(len(p["faces"]) == 1 for p in predictions[:-1])


def test_v2_answers_are_the_in_process_analysis(server, analyzer, photos):
    answer = v2(server, photos)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["model_name"], body["id"]) == (NAME, "request-1")
    (output,) = body["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("results", "BYTES", [len(photos)])
    for served, expected in zip(output["data"], analyzer.analyze(photos), strict=True):
        assert_same(ImageResult.model_validate_json(served).model_dump(mode="json"), expected)


def test_an_image_without_a_face_is_an_answer_with_its_status(server):
    answer = v1(server, [noise(1)])
    assert answer.status_code == 200
    (prediction,) = answer.json()["predictions"]
    assert prediction["status"] == "no_face" and prediction["faces"] == [] and "score" in prediction["reason"]


def test_health_readiness_and_metadata(server):
    assert http.get(f"{server}/v2/health/live").json() == {"live": True}
    assert http.get(f"{server}/v2/health/ready").json() == {"ready": True}
    assert http.get(f"{server}/v1/models/{NAME}").json() == {"name": NAME, "ready": True}
    assert http.get(f"{server}/v2/models/{NAME}/ready").json()["ready"] is True
    metadata = http.get(f"{server}/v2/models/{NAME}").json()
    assert metadata["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert metadata["outputs"] == [{"name": "results", "datatype": "BYTES", "shape": [-1]}]
    assert http.get(f"{server}/v1/models/elsewhere").status_code == 404


def test_concurrent_requests_never_mix_their_results(server, analyzer, photos):
    variants = [
        *photos,
        *(png(np.asarray(Image.open(io.BytesIO(p)).convert("RGB"))[:, ::-1].copy()) for p in photos),
        noise(2, (90, 110, 3)),
        noise(3, (130, 70, 3)),
    ]
    expected = analyzer.analyze(variants)
    order = [i % len(variants) for i in range(48)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: v1(server, [variants[i]]), order))
    for i, answer in zip(order, answers, strict=True):
        assert answer.status_code == 200
        assert_same(answer.json()["predictions"][0], expected[i])


# ---- bad input -----------------------------------------------------------------------------------


def bomb() -> bytes:
    """A 97 kB PNG that claims 10,000 x 10,000 pixels."""
    buffer = io.BytesIO()
    Image.new("L", (10_000, 10_000)).save(buffer, format="PNG")
    return buffer.getvalue()


V1_BAD = {
    "not an image": ({"instances": [{"image_bytes": {"b64": b64(b"just some text")}}]}, "not a decodable image"),
    "truncated image": ({"instances": [{"image_bytes": {"b64": b64(noise(4)[:300])}}]}, "not a decodable image"),
    "decompression bomb": ({"instances": [{"image_bytes": {"b64": b64(bomb())}}]}, "megapixels"),
    "bad base64": ({"instances": [{"image_bytes": {"b64": "not*base64!"}}]}, "not valid base64"),
    "empty image": ({"instances": [{"image_bytes": {"b64": ""}}]}, "empty image"),
    "no instances": ({"instances": []}, "at least one instance"),
    "wrong field": ({"instances": [{"image": "x"}]}, "image_bytes"),
    "b64 not a string": ({"instances": [{"b64": 12}]}, "base64 string"),
}


@pytest.mark.parametrize("case", V1_BAD)
def test_bad_v1_requests_get_a_400_with_one_line(server, photos, case):
    body, reason = V1_BAD[case]
    answer = http.post(f"{server}/v1/models/{NAME}:predict", json=body)
    assert answer.status_code == 400
    assert reason in answer.json()["error"] and "\n" not in answer.json()["error"]
    assert_still_serving(server, photos[0])


@pytest.mark.parametrize("path", [f"/v1/models/{NAME}:predict", f"/v2/models/{NAME}/infer"])
@pytest.mark.parametrize("body", [b"", b'{"instances": [', b"\xff\xd8 binary"], ids=["empty", "malformed", "binary"])
def test_empty_and_malformed_bodies_get_a_400_with_one_line(server, photos, path, body):
    answer = http.post(f"{server}{path}", content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400 and "\n" not in answer.json()["error"]
    assert_still_serving(server, photos[0])


def test_a_v2_request_needs_one_bytes_input(server):
    body = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}
    answer = http.post(f"{server}/v2/models/{NAME}/infer", json=body)
    assert answer.status_code == 400 and "one BYTES input" in answer.json()["error"]


def test_the_v2_binary_data_extension_is_refused_in_one_line(server, photos):
    header = (
        b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 8}}]}'
    )
    answer = http.post(
        f"{server}/v2/models/{NAME}/infer",
        content=header + b"\x89PNG\r\n\x1a\n",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert answer.status_code == 400 and "base64" in answer.json()["error"]
    assert_still_serving(server, photos[0])


def test_a_bad_image_refuses_the_whole_request(server, photos):
    answer = v1(server, [photos[0], b"not an image"])
    assert answer.status_code == 400 and answer.json()["error"].startswith("image 1:")


def test_a_body_over_the_limit_is_refused_before_it_is_read(server, photos):
    started = time.perf_counter()
    answer = http.post(
        f"{server}/v1/models/{NAME}:predict",
        content=os.urandom(50_000_000),
        headers={"Content-Type": "application/json"},
    )
    assert answer.status_code == 413 and f"limit of {LIMIT_MB} MB" in answer.json()["error"]
    assert time.perf_counter() - started < 10
    # a client that waits for 100-continue sends only the headers and still gets the answer
    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            f"POST /v1/models/{NAME}:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 50000000\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")
    # a chunked body is cut off as it passes the limit
    chunks = (os.urandom(1_000_000) for _ in range(2 * LIMIT_MB))
    answer = http.post(f"{server}/v1/models/{NAME}:predict", content=chunks)
    assert answer.status_code == 413
    assert_still_serving(server, photos[0])


# ---- model loading -------------------------------------------------------------------------------


def test_a_folder_that_is_not_a_model_is_refused_before_the_server_starts(tmp_path):
    (tmp_path / "notes.txt").write_text("no model here")
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "d2mtl.cli", "serve", "--model", str(tmp_path), "--port", str(port)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "not a model folder" in result.stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


@pytest.mark.parametrize("option", [["--port", "70000"], ["--max-request-mb", "0"]])
def test_bad_options_are_one_line(model_dir, option):
    result = subprocess.run(
        [sys.executable, "-m", "d2mtl.cli", "serve", "--model", model_dir, *option],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "error" in result.stderr


def test_a_model_in_object_storage_is_served_with_either_backend(s3_env, model_dir, analyzer, photos, tmp_path):
    """The default forward pass on CPU is onnxruntime (the other tests); this server runs torch's."""
    for path in Path(model_dir).iterdir():
        store.upload_file(path, f"s3://bucket/served/student/{path.name}")
    port = free_port()
    process = start_server(
        "s3://bucket/served/student",
        port,
        tmp_path / "server.log",
        env={k: v for k, v in os.environ.items() if k.startswith("AWS_")},
        backend="torch",
    )
    try:
        answer = v1(f"http://127.0.0.1:{port}", photos[:1])
        assert answer.status_code == 200
        assert_same(answer.json()["predictions"][0], analyzer.analyze(photos[:1])[0])
    finally:
        stop_server(process)


# ---- the page, in a real browser -------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(
            "no chromium + chromedriver: install Debian's (apt-get install chromium chromium-driver, "
            "as .ci/system-packages does) to run the browser test"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1300,1800",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def upload(browser, server: str, path: Path) -> str:
    """Pick ``path`` in the page's file input; returns the status line once the answer is drawn."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{server}/ui")
    browser.find_element(By.ID, "file").send_keys(str(path))
    status = browser.find_element(By.ID, "status")
    WebDriverWait(browser, 60).until(lambda _: status.get_attribute("data-state") in ("done", "error"))
    return status.text


def test_the_page_shows_each_face_with_its_attributes(browser, server, analyzer, face_photos, tmp_path):
    from selenium.webdriver.common.by import By

    path = face_photos[0]
    assert upload(browser, server, path) == f"1 face(s) in {path.name}"
    (expected,) = analyzer.analyze(path.read_bytes())[0].faces
    (item,) = browser.find_elements(By.CSS_SELECTOR, "#faces li")
    for task, estimate in expected.classes.items():
        assert item.get_attribute(f"data-{task}") == estimate.label
        assert f"{task} {estimate.label}" in item.text
    assert float(item.get_attribute("data-age")) == pytest.approx(expected.age.years, abs=0.05)
    assert browser.find_element(By.ID, "canvas").is_displayed()
    # the photo at its size, the face's box drawn in the first face colour (#e6194b) on its top edge
    assert browser.execute_script("const c = document.getElementById('canvas'); return [c.width, c.height];") == list(
        Image.open(path).size
    )
    x1, y1, x2, _ = expected.box
    pixel = browser.execute_script(
        "return Array.from(document.getElementById('canvas').getContext('2d')"
        ".getImageData(arguments[0], arguments[1], 1, 1).data);",
        round((x1 + x2) / 2),
        max(0, round(y1)),
    )
    assert pixel[:3] == pytest.approx([0xE6, 0x19, 0x4B], abs=40)

    (tmp_path / "noise.png").write_bytes(noise(5))
    assert upload(browser, server, tmp_path / "noise.png").startswith("No face in noise.png")
    assert browser.find_elements(By.CSS_SELECTOR, "#faces li") == []
    (tmp_path / "text.jpg").write_bytes(b"not an image at all")
    assert "not a decodable image" in upload(browser, server, tmp_path / "text.jpg")
