"""Schemathesis hooks for Statefold (loaded through SCHEMATHESIS_HOOKS by tests/openapi.rs).

The serializer of `application/wasm` (the body of `PUT /v1/reducers/{name}`): a deploy of
a schema-valid body sends the module the server runs for that name (from
STATEFOLD_MODULES: the deploy answers `unchanged` after the whole check), or the generated
bytes when no such module exists; a rollback (`?version=`) sends no body; a value that is
not a binary string (negative data) goes as its JSON text, which is no module.

The check `refused_writes_store_nothing`: a write the server refuses (any 4xx or 5xx
answer to a POST or PUT) leaves the log as it was. The server folds the embedded log, whose end
per topic `/readyz` reports exactly, so the sum of the ends is read before each POST and
again after a refused one. One exception, by design: an append with `?wait=applied` that
the reducer refuses (409 `refused`, 422 `reducer_failed`) is in the log, listed as a
rejection, and the model is as it was: its hash is compared instead. Run with one worker,
so no other request moves the log between.
"""

import json
import os
import urllib.parse
import urllib.request

import schemathesis

BASE = os.environ["STATEFOLD_URL"].rstrip("/")
MODULES = os.environ["STATEFOLD_MODULES"]
_before = {}


@schemathesis.serializer("application/wasm")
def wasm_module(ctx, value):
    case = ctx.case
    if (case.query or {}).get("version") is not None:
        return b""
    if isinstance(value, (bytes, str)):
        name = (case.path_parameters or {}).get("name")
        path = os.path.join(MODULES, f"{name}.wasm") if isinstance(name, str) and name.isidentifier() else None
        if path and os.path.isfile(path):
            with open(path, "rb") as module:
                return module.read()
        return value if isinstance(value, bytes) else value.encode()
    return json.dumps(value).encode()


def get(path):
    try:
        with urllib.request.urlopen(BASE + path, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def log_end():
    return sum(p.get("end") or 0 for p in get("/readyz")[1]["partitions"])


def model_path(case):
    """The model an append names, if it is one."""
    parts = case.formatted_path.strip("/").split("/")
    if len(parts) == 5 and parts[:2] == ["v1", "models"] and parts[4] == "diffs":
        return "/" + "/".join(parts[:4])
    return None


def head(path):
    status, body = get(urllib.parse.quote(path, safe="/%"))
    return body.get("hash") if status == 200 else None


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    if case.method.upper() in ("POST", "PUT"):
        path = model_path(case)
        _before[id(case)] = (log_end(), path and head(path))


@schemathesis.check
def refused_writes_store_nothing(ctx, response, case):
    before = _before.pop(id(case), None)
    if before is None or response.status_code < 400:
        return
    (before, hash_before), after = before, log_end()
    try:
        code = response.json()["error"]["code"]
    except Exception:
        code = None
    if code in ("refused", "reducer_failed"):
        path = model_path(case)
        if path and head(path) != hash_before:
            raise AssertionError(f"{case.method} {case.formatted_path} was refused ({code}) but the model changed")
        return
    if after != before:
        raise AssertionError(
            f"{case.method} {case.formatted_path} was refused ({response.status_code}) "
            f"but the log grew from {before} to {after} records"
        )
