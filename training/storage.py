"""Storage root helpers: a local path or any fsspec URL (s3://bucket/prefix).

Every artifact of a run is addressed by a URI string; these helpers are the only place that
turns one into a filesystem. JSON files are written whole (a temp file then a rename on local
disks; S3 PUTs are atomic per object), so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from training.recipe import EMBEDDED


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return url_to_fs(uri)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_text(uri: str) -> str:
    with fsspec.open(uri, "r") as f:
        return f.read()


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


def write_text(uri: str, text: str) -> None:
    if is_local(uri):
        path = Path(uri.removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    else:
        with fsspec.open(uri, "w") as f:
            f.write(text)


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, default=str) + "\n")


def resolve_embedded(uri: str) -> str:
    """Map embedded://base-model and embedded://curriculum/... to the built lab assets."""
    if not uri.startswith(EMBEDDED):
        return uri
    from training.embedded import build_assets  # builds once, then a cache hit

    assets = build_assets()
    rest = uri.removeprefix(EMBEDDED)
    if rest == "base-model":
        return str(assets.base_model_dir)
    if rest.startswith("curriculum/"):
        return str(assets.curriculum_dir / rest.removeprefix("curriculum/"))
    raise ValueError(f"unknown embedded asset {uri!r} (expected embedded://base-model or embedded://curriculum/...)")
