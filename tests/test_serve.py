"""The Ray Serve endpoint: real Ray Serve on 127.0.0.1, real HTTP requests, answers equal
``predict``'s, requests batched across clients, and a clear 4xx for every bad request."""

from __future__ import annotations

import base64
import io
import json
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import CONFIGS, need_shared
from test_use import SENTENCES, write_digits

from trainers.loop import fit
from trainers.recipe import load_config

pytestmark = pytest.mark.ray


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body: bytes | None = None, method: str = "POST") -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def post(url: str, doc) -> tuple[int, dict]:
    return call(url + "/predict", json.dumps(doc).encode())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("serve")
    text = fit(load_config(CONFIGS / "sst2-minilm.yaml", [
        "data.root=" + str(need_shared("data", "text", "sst2")), "data.shots=4",
        "train.max_steps=2", "data.max_test=8", f"train.output_dir={work}", "train.run_name=text",
        "train.progress=false", "train.test=false"])).run_dir
    write_digits(work / "digits")
    image = fit(load_config(CONFIGS / "tiny-digits.yaml", [
        "data.format=image_folder", f"data.root={work / 'digits'}", "data.shots=5",
        "data.val_shots=0", "train.epochs=1", f"train.output_dir={work}", "train.run_name=image",
        "train.test=false"])).run_dir
    return {"text": text, "image": image, "digits": work / "digits"}


@pytest.fixture(scope="module")
def endpoints(local_ray, runs):
    """One Serve instance on a free localhost port: the text model batched (a long wait so
    concurrent requests surely meet) and the image model, under their own route prefixes."""
    from ray import serve

    from cluster.serve import ServeLimits, serve_model

    port = free_port()
    limits = ServeLimits(max_inputs=8, max_chars=200, max_body_bytes=20000)
    text = serve_model(runs["text"], port=port, batch_wait_s=0.25, max_batch_size=16,
                       limits=limits, name="text", route_prefix="/text", cpus_per_replica=0.5)
    image = serve_model(runs["image"], port=port, name="image", route_prefix="/image",
                        cpus_per_replica=0.5)
    yield {"text": text, "image": image}
    serve.shutdown()


def test_binds_to_localhost_by_default(endpoints) -> None:
    assert endpoints["text"].startswith("http://127.0.0.1:")


def test_text_answers_equal_predict(endpoints, runs) -> None:
    from trainers.predictor import load_predictor

    status, doc = post(endpoints["text"], {"texts": SENTENCES})
    assert status == 200, doc
    want = load_predictor(runs["text"]).predict(SENTENCES)
    got = np.array([list(p["probs"].values()) for p in doc["predictions"]])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert [p["label"] for p in doc["predictions"]] == want.argmax(-1).tolist()
    assert {p["label_text"] for p in doc["predictions"]} <= {"negative", "positive"}


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(endpoints, runs) -> None:
    from trainers.predictor import load_predictor

    url = endpoints["text"]
    before = call(url + "/", method="GET")[1]["served"]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda s: post(url, {"texts": [s]}), SENTENCES * 2))
    after = call(url + "/", method="GET")[1]["served"]
    want = load_predictor(runs["text"]).predict(SENTENCES * 2)
    for (status, doc), w in zip(answers, want):
        assert status == 200
        np.testing.assert_allclose(list(doc["predictions"][0]["probs"].values()), w, atol=1e-5)
    requests = after["requests"] - before["requests"]
    passes = after["forward_passes"] - before["forward_passes"]
    assert requests == 10 and passes < requests, (requests, passes)


def test_image_model_takes_base64_images(endpoints, runs) -> None:
    from trainers.predictor import load_images, load_predictor

    files = sorted((runs["digits"] / "test" / "4").glob("*.png"))[:3]
    status, doc = post(endpoints["image"], {"images": [base64.b64encode(f.read_bytes()).decode()
                                                       for f in files]})
    assert status == 200, doc
    predictor = load_predictor(runs["image"])
    want = predictor.predict(load_images(files, predictor.source.cfg))
    np.testing.assert_allclose([list(p["probs"].values()) for p in doc["predictions"]], want,
                               atol=1e-5)


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 422, "expected a JSON object"),
    (b'{"text": ["x"]}', 422, "missing key 'texts'"),
    (b'{"texts": "one string"}', 422, "texts: expected a list"),
    (b'{"texts": []}', 422, "empty list"),
    (b'{"texts": ["ok", 3]}', 422, "texts[1]: expected a string"),
    (b'{"texts": ["ok", "  "]}', 422, "texts[1]: empty text"),
    (json.dumps({"texts": ["x"] * 9}).encode(), 413, "9 inputs, at most 8"),
    (json.dumps({"texts": ["x" * 201]}).encode(), 413, "texts[0]: 201 characters, at most 200"),
    (json.dumps({"texts": ["x" * 150] * 8, "pad": "y" * 20000}).encode(), 413, "at most 20000"),
    (b'{"images": ["aGk="]}', 422, "this model takes text"),
])
def test_bad_text_requests_get_a_clear_4xx(endpoints, body, status, words) -> None:
    got, doc = call(endpoints["text"] + "/predict", body)
    assert got == status, doc
    assert words in doc["error"] and "\n" not in doc["error"]


def test_bad_routes_and_image_requests(endpoints) -> None:
    assert call(endpoints["text"] + "/predict", method="GET") == (
        405, {"error": "GET /predict: use POST"})
    status, doc = call(endpoints["text"] + "/classify", b"{}")
    assert status == 404 and "POST /predict" in doc["error"]
    status, doc = post(endpoints["image"], {"texts": ["a digit"]})
    assert status == 422 and "this model takes image" in doc["error"]
    status, doc = post(endpoints["image"], {"images": ["%%%"]})
    assert (status, doc["error"]) == (422, "images[0]: not base64")
    junk = base64.b64encode(b"not an image at all").decode()
    status, doc = post(endpoints["image"], {"images": [junk]})
    assert (status, doc["error"]) == (422, "images[0]: not a readable image")


def test_parse_request_without_ray() -> None:
    """The validation is plain code: the same messages reach a test without a server."""
    from cluster.serve import RequestError, ServeLimits, parse_request

    limits = ServeLimits()
    assert parse_request(b'{"texts": ["a", "b"]}', "text", limits) == ["a", "b"]
    with pytest.raises(RequestError) as e:
        parse_request(io.BytesIO(b"\xff\xfe").read(), "text", limits)
    assert e.value.status == 400
