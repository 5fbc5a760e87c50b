"""Ray Serve endpoint for a trained or exported model: ``POST /predict`` with JSON.

    POST /predict  {"texts": ["a moving film", ...]}      (text models)
                   {"images": ["<base64 PNG/JPEG>", ...]}  (image models)
    -> 200 {"predictions": [{"label": 1, "label_text": "positive", "probs": {...}}, ...]}
    GET  /         model, classes, modality and request limits

Requests are batched across clients with ``@serve.batch`` (one forward pass for all texts that
arrive within ``batch_wait_s``). Bad requests get a 4xx and one line saying what is wrong:
400 malformed JSON, 404/405 wrong route or method, 413 too many or too long inputs or too large
a body, 422 well-formed JSON of the wrong shape. HTTP binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ray import serve

from trainers.errors import ConfigError, SmallshotError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
APP_NAME = "smallshot"


@dataclass(kw_only=True)
class ServeLimits:
    """What one request may hold; beyond it the endpoint answers 413."""

    max_inputs: int = 64  # texts or images per request
    max_chars: int = 4000  # characters per text (the tokenizer truncates far earlier anyway)
    max_body_bytes: int = 8 << 20  # whole request body

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"serve limit {name}={value!r}: must be an integer >= 1")


class RequestError(Exception):
    """A bad request: its HTTP status and the one-line message the client gets."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_request(body: bytes, modality: str, limits: ServeLimits, image_loader=None) -> Any:
    """The texts (list of str) or images (tensor) of a /predict body, or a RequestError."""
    if len(body) > limits.max_body_bytes:
        raise RequestError(413, f"body of {len(body)} bytes, at most {limits.max_body_bytes}")
    try:
        doc = json.loads(body)
    except UnicodeDecodeError:
        raise RequestError(400, "body is not UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise RequestError(400, f"body is not valid JSON ({e.msg} at line {e.lineno} column "
                                f"{e.colno})") from None
    key, other = ("texts", "images") if modality == "text" else ("images", "texts")
    shape = ('{"texts": ["...", ...]}' if modality == "text"
             else '{"images": ["<base64 PNG/JPEG>", ...]}')
    if not isinstance(doc, dict):
        raise RequestError(422, f"expected a JSON object {shape}, got {type(doc).__name__}")
    if key not in doc:
        if other in doc:
            raise RequestError(422, f"this model takes {modality}: send {shape}, not {other!r}")
        raise RequestError(422, f"missing key {key!r}: send {shape}")
    items = doc[key]
    if not isinstance(items, list):
        raise RequestError(422, f"{key}: expected a list, got {type(items).__name__}")
    if not items:
        raise RequestError(422, f"{key}: empty list; send at least one")
    if len(items) > limits.max_inputs:
        raise RequestError(413, f"{key}: {len(items)} inputs, at most {limits.max_inputs} per "
                                f"request")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise RequestError(422, f"{key}[{i}]: expected a string, got {type(item).__name__}")
        if modality == "text":
            if not item.strip():
                raise RequestError(422, f"texts[{i}]: empty text")
            if len(item) > limits.max_chars:
                raise RequestError(413, f"texts[{i}]: {len(item)} characters, at most "
                                        f"{limits.max_chars}")
    if modality == "text":
        return items
    return image_loader(items)


@serve.deployment(name="ModelServer", max_ongoing_requests=32)
class ModelServer:
    """One replica: the model with its preprocessing, batching requests when asked."""

    def __init__(self, model_dir: str, batched: bool = True, max_batch_size: int = 16,
                 batch_wait_s: float = 0.005, limits: dict | None = None):
        from trainers.predictor import load_predictor

        self.predictor = load_predictor(model_dir)
        self.batched = batched
        self.limits = ServeLimits(**(limits or {}))
        self.predict_batch.set_max_batch_size(max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(batch_wait_s)
        self.counts = {"requests": 0, "forward_passes": 0}  # shows whether batching merges

    def _images(self, items: list[str]) -> Any:
        import torch

        from trainers.data import load_image

        d = self.predictor.source.cfg.data
        tensors = []
        for i, item in enumerate(items):
            try:
                raw = base64.b64decode(item, validate=True)
            except (binascii.Error, ValueError):
                raise RequestError(422, f"images[{i}]: not base64") from None
            try:
                tensors.append(load_image(io.BytesIO(raw), d.image_size, d.channels))
            except SmallshotError:
                raise RequestError(422, f"images[{i}]: not a readable image") from None
        if len({tuple(t.shape) for t in tensors}) > 1:
            raise RequestError(422, "images: of different sizes; send one size per request")
        return torch.stack(tensors).float().div_(255.0)

    def _predict(self, inputs: Any) -> list[dict[str, Any]]:
        from trainers.predictor import prediction_rows

        self.counts["forward_passes"] += 1
        probs = self.predictor.predict(inputs, batch_size=max(len(inputs), 1))
        rows = prediction_rows(probs, [""] * len(probs), self.predictor.classes)
        return [{k: v for k, v in r.items() if k != "id"} for r in rows]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def predict_batch(self, requests: list[Any]) -> list[list[dict[str, Any]]]:
        """Many requests' inputs in one forward pass; each request gets its own rows back."""
        sizes = [len(r) for r in requests]
        if self.predictor.modality == "text":
            merged: Any = [t for r in requests for t in r]
        else:
            import torch

            merged = torch.cat(list(requests))
            if len({tuple(r.shape[1:]) for r in requests}) > 1:  # one size per forward pass
                return [await asyncio.to_thread(self._predict, r) for r in requests]
        rows = await asyncio.to_thread(self._predict, merged)
        out, start = [], 0
        for n in sizes:
            out.append(rows[start:start + n])
            start += n
        return out

    def info(self) -> dict[str, Any]:
        src = self.predictor.source
        return {"model": str(src.folder), "kind": src.kind, "modality": src.modality,
                "classes": self.predictor.classes, "batched": self.batched,
                "limits": asdict(self.limits), "served": dict(self.counts)}

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        path = request.url.path[len(request.scope.get("root_path", "")):].rstrip("/") or "/"
        if path == "/" and request.method == "GET":
            return JSONResponse(self.info())
        if path != "/predict":
            return JSONResponse({"error": f"no route {request.method} {path}; POST /predict"},
                                status_code=404)
        if request.method != "POST":
            return JSONResponse({"error": f"{request.method} /predict: use POST"},
                                status_code=405)
        try:
            length = int(request.headers.get("content-length") or 0)
            if length > self.limits.max_body_bytes:
                raise RequestError(413, f"body of {length} bytes, at most "
                                        f"{self.limits.max_body_bytes}")
            inputs = parse_request(await request.body(), self.predictor.modality, self.limits,
                                   self._images)
        except RequestError as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        self.counts["requests"] += 1
        if self.batched:
            rows = await self.predict_batch(inputs)
        else:
            rows = await asyncio.to_thread(self._predict, inputs)
        return JSONResponse({"predictions": rows})


def build_app(args: dict[str, Any]) -> Any:
    """The Serve application for ``args`` (model, batched, max_batch_size, batch_wait_ms,
    max_inputs, max_chars, max_body_bytes): the import path a RayService's serveConfigV2 or
    `serve run cluster.serve:build_app model=...` names. Replicas and CPUs come from there."""
    known = {"model", "batched", "max_batch_size", "batch_wait_ms", *asdict(ServeLimits())}
    unknown = sorted(set(args) - known)
    if unknown or "model" not in args:
        raise ConfigError(f"serve args: {'unknown ' + ', '.join(unknown) if unknown else 'model'}"
                          f" ({'allowed: ' + ', '.join(sorted(known)) if unknown else 'required'})")
    limits = ServeLimits(**{k: int(v) for k, v in args.items() if k in asdict(ServeLimits())})
    batched = str(args.get("batched", True)).lower() not in ("false", "0", "no")
    return ModelServer.bind(str(args["model"]), batched, int(args.get("max_batch_size", 16)),
                            float(args.get("batch_wait_ms", 5.0)) / 1000, asdict(limits))


def serve_model(model_dir: str | Path, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                batched: bool = True, max_batch_size: int = 16, batch_wait_s: float = 0.005,
                replicas: int = 1, cpus_per_replica: float = 1.0, limits: ServeLimits | None = None,
                name: str = APP_NAME, route_prefix: str = "/", address: str | None = None) -> str:
    """Deploy the model on Ray Serve (connecting to or starting Ray); return its base URL."""
    from cluster.session import ensure_ray
    from trainers.predictor import locate_model

    src = locate_model(model_dir)  # a bad folder fails here, in one line, before Ray starts
    if max_batch_size < 1 or batch_wait_s < 0 or replicas < 1:
        raise ConfigError(f"serve: max_batch_size={max_batch_size} (>= 1), batch_wait_s="
                          f"{batch_wait_s} (>= 0), replicas={replicas} (>= 1)")
    limits = limits or ServeLimits()
    ensure_ray(address)
    serve.start(http_options={"host": host, "port": port})
    app = ModelServer.options(num_replicas=replicas,
                              ray_actor_options={"num_cpus": cpus_per_replica}).bind(
        str(Path(src.folder).resolve()), batched, max_batch_size, batch_wait_s, asdict(limits))
    serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}{route_prefix.rstrip('/')}"
