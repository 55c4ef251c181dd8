"""Artefact I/O shared by every verb: atomic JSON writes, schema-checked loads."""
from __future__ import annotations

import json
import os
import pathlib
import tempfile

from .errors import BadInput


def write_atomic(path: str | os.PathLike, data: bytes | str) -> pathlib.Path:
    """Write to a temp file in the same folder, then rename: never half-written."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; an artefact is for sharing
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj: dict) -> pathlib.Path:
    return write_atomic(path, json.dumps(obj, indent=1) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> dict:
    """Read a JSON object, turning every failure into a one-line BadInput."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise BadInput(f"{what} {p}: no such file")
    try:
        obj = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"{what} {p}: malformed JSON ({e})") from e
    if not isinstance(obj, dict):
        raise BadInput(f"{what} {p}: expected a JSON object")
    return obj


def check_schema(obj: dict, schema: str, where: str) -> None:
    got = obj.get("schema")
    if got != schema:
        raise BadInput(f"{where}: field 'schema' is {got!r}, expected {schema!r}")
