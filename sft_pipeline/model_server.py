"""The REST API of the version a registry alias points at (`champion`), following the alias as it moves.

    python -m flows.serve model [--alias champion] [--port 5001]     # `make serve-model`; Ctrl-C stops it

At start it reads params.yaml once (the MLflow store, mlflow.registered_model, serve.model_poll_s) and loads the
version the alias points at; it does not start when no version holds the alias or that version fails to load. Then,
every serve.model_poll_s seconds, it asks the registry where the alias points. When the alias has moved it loads the
new version beside the one serving and switches once it has loaded: a request takes the version serving when it
arrives and finishes on it, so none is refused during the swap. A version that fails to load is reported (the log,
GET /version) and the old one keeps serving; it is tried again once the alias has pointed at another version.

    POST /invocations   MLflow's scoring protocol, parsed and answered by mlflow.pyfunc.scoring_server (JSON with
                        dataframe_records, dataframe_split, inputs or instances; CSV; Parquet) -> {"predictions":
                        [...]}; the X-Model-Version header names the version that answered. Input the model cannot
                        answer gets 400 {"error_code": "INVALID_PARAMETER_VALUE", "message": <row, field, expected>}.
    GET  /health, /ping {"status": "ok", "model", "alias", "version"}
    GET  /version       the version serving, its run, when it loaded, the last check, versions that failed to load

The versions served run this process's code: sft_pipeline is imported once, from the project, at start (each
version's own logged copy of it is what `mlflow models serve -m models:/<name>/<version>` would use). Restart the
server after changing sft_pipeline.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from sft_pipeline.tasks.base import InputError

VERSION_HEADER = "X-Model-Version"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def say(message: str) -> None:
    print(f"model server: {message}", flush=True)


@dataclass(frozen=True)
class Loaded:
    version: str
    run_id: str
    model: Any  # mlflow.pyfunc.PyFuncModel
    loaded_at: str
    load_s: float


class Follower:
    """Which version of `name` holds `alias`, loaded; `check` moves it along with the registry."""

    def __init__(self, name: str, alias: str, poll_s: float, client=None, load: Callable | None = None):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.name, self.alias, self.poll_s = name, alias, poll_s
        self.client = client or MlflowClient()
        self.load = load or mlflow.pyfunc.load_model
        self.current: Loaded | None = None
        self.failed: dict[str, str] = {}  # version -> why it did not load
        self.last_check: str | None = None
        self.check_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> bool:
        """Load the version the alias points at if it is not the one serving; True when a new version now serves."""
        from mlflow.exceptions import MlflowException

        self.last_check = now()
        try:
            found = self.client.get_model_version_by_alias(self.name, self.alias)
        except MlflowException as exc:
            # The alias was removed, or the store is unreachable: what serves keeps serving.
            problem = f"no version of {self.name} holds alias {self.alias!r} ({exc.message.splitlines()[0]})"
            if problem != self.check_error:
                say(problem + ("" if self.current is None else f"; v{self.current.version} keeps serving"))
            self.check_error = problem
            return False
        self.check_error = None
        version = str(found.version)
        if self.current is not None and version == self.current.version:
            self.failed.clear()  # the alias is back on what serves: a version that failed may be tried again
            return False
        if version in self.failed:
            return False
        serving = "" if self.current is None else f" (v{self.current.version} serves meanwhile)"
        say(f"loading {self.name} v{version} ({self.alias}){serving}")
        start = time.monotonic()
        try:
            model = self.load(f"models:/{self.name}/{version}")
        except Exception as exc:  # any failure of a version's own loading code is that version's
            self.failed = {version: f"{type(exc).__name__}: {exc}"}
            keeps = "nothing is served" if self.current is None else f"v{self.current.version} keeps serving"
            say(f"v{version} failed to load ({self.failed[version]}); {keeps}")
            return False
        before = self.current
        self.current = Loaded(version, found.run_id, model, now(), round(time.monotonic() - start, 2))
        say(f"serving v{version} (loaded in {self.current.load_s} s)"
            + ("" if before is None else f", was v{before.version}"))
        return True

    def start_polling(self) -> None:
        def poll():
            while not self._stop.wait(self.poll_s):
                try:
                    self.check()
                except Exception:  # the poller must outlive any one failed check
                    say(f"check failed:\n{traceback.format_exc()}")

        self._thread = threading.Thread(target=poll, name="alias-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def state(self) -> dict:
        import mlflow

        c = self.current
        return {"model": self.name, "alias": self.alias, "version": c and c.version, "run_id": c and c.run_id,
                "loaded_at": c and c.loaded_at, "load_s": c and c.load_s, "poll_s": self.poll_s,
                "last_check": self.last_check, "check_error": self.check_error, "failed": dict(self.failed),
                "mlflow": mlflow.__version__}


def parse_schema(model, body: bytes, content_type: str):
    """The schema MLflow parses a request with: the model's input schema, as `mlflow models serve` does. Without one
    (our models since they check their own input), a JSON list under `inputs` is parsed as Any: otherwise MLflow
    makes a numpy array of it, which turns ["a text", 5] into ["a text", "5"] before predict could see the 5."""
    schema = model.metadata.get_input_schema()
    if schema is not None or not content_type.split(";")[0].strip() == "application/json":
        return schema
    try:
        inputs = json.loads(body).get("inputs")
    except (ValueError, AttributeError):
        return None  # MLflow's parser says what is wrong with it
    if not isinstance(inputs, list):
        return None
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import AnyType

    return Schema([ColSpec(AnyType())])


def error_body(exc) -> dict:
    """The error as the client gets it: MLflow's code and message, or the task's own message for input it cannot
    answer; never a traceback (that goes to the server's log)."""
    if isinstance(exc.__cause__, InputError):
        return {"error_code": exc.error_code, "message": str(exc.__cause__)}
    if exc.json_kwargs.get("stack_trace"):
        say(f"{exc.message}\n{exc.json_kwargs['stack_trace']}")
    return {"error_code": exc.error_code, "message": exc.message}


def app(follower: Follower) -> FastAPI:
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    api = FastAPI(title=f"{follower.name}@{follower.alias}", docs_url=None, redoc_url=None, openapi_url=None)

    @api.get("/ping")
    @api.get("/health")
    async def health():
        served = follower.current
        return JSONResponse({"status": "ok", "model": follower.name, "alias": follower.alias,
                             "version": served.version}, headers={VERSION_HEADER: served.version})

    @api.get("/version")
    async def version():
        return JSONResponse(follower.state())

    @api.post("/invocations")
    async def invocations(request: Request):
        served = follower.current  # this request is answered by this version, whatever loads meanwhile
        headers = {VERSION_HEADER: served.version}
        body = await request.body()
        content_type = request.headers.get("content-type", "")
        try:
            result = await asyncio.to_thread(scoring_server.invocations, body, content_type, served.model,
                                             parse_schema(served.model, body, content_type))
        except MlflowException as exc:
            return JSONResponse(error_body(exc), status_code=exc.get_http_status_code(), headers=headers)
        return Response(content=result.response, status_code=result.status, media_type=result.mimetype,
                        headers=headers)

    return api


def serve(name: str, alias: str, poll_s: float, host: str, port: int) -> int:
    """Load the alias's version, then serve it and follow the alias until interrupted; 1 when nothing loads."""
    import uvicorn

    follower = Follower(name, alias, poll_s)
    follower.check()
    if follower.current is None:
        why = follower.check_error or "; ".join(f"v{v}: {e}" for v, e in follower.failed.items())
        print(f"model server: nothing to serve: {why}", file=sys.stderr)
        return 1
    follower.start_polling()
    say(f"{name}@{alias} v{follower.current.version} on http://{host}:{port}/invocations; the registry is asked "
        f"where {alias!r} points every {poll_s:g} s (serve.model_poll_s); Ctrl-C stops it")
    try:
        uvicorn.run(app(follower), host=host, port=port, log_level="warning", workers=1)
    finally:
        follower.stop()
    return 0
