"""Storage root helpers: a local path or any fsspec URL (s3://bucket/prefix).

Every artifact of a run is addressed by a URI string; these helpers are the only place that
turns one into a filesystem. JSON files are written whole (a temp file then a rename on local
disks; S3 PUTs are atomic per object), so a reader never sees half a file.

Remote roots: training needs a local directory, so each remote URI has a local mirror under
the staging directory (`local_path`). A phase trains into its mirror; checkpoints are uploaded
from there (`upload_tree`, files first, meta.json last, skipping objects already uploaded) and
downloaded into it when another machine evaluates or starts from them (`local_checkpoint`).
Credentials come from the environment only (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL, AWS profiles): s3fs / botocore read them; nothing here takes or logs them.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from core.recipe import EMBEDDED


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
    write_bytes(uri, text.encode())


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file: locally through a temporary file and a rename, so readers never see half of it."""
    if is_local(uri):
        path = Path(uri.removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        with fsspec.open(uri, "wb") as f:
            f.write(data)


def open_binary(uri: str) -> Any:
    """A binary read handle on a local path or fsspec URL (a context manager)."""
    return fsspec.open(uri, "rb")


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, default=str) + "\n")


def staging_dir() -> Path:
    """Where remote URIs are mirrored locally: $RECIPE_LAB_STAGING, else <cache>/staging."""
    from embedded import default_cache_dir

    return Path(os.environ.get("RECIPE_LAB_STAGING") or default_cache_dir() / "staging")


def local_path(uri: str) -> Path:
    """The local directory of a URI: itself when local; for a remote URI its mirror
    <staging>/<protocol>/<bucket>/<key>, keyed by the whole URI so that runs never share one."""
    if is_local(uri):
        return Path(uri.removeprefix("file://"))
    fs, path = filesystem(uri)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return staging_dir() / protocol / path.strip("/")


def complete_checkpoints(phase_uri: str) -> list[str]:
    """URIs of a phase's complete checkpoints (those with meta.json), by samples seen, on any
    root: what `lab eval` scores in a run that may live in a bucket."""
    fs, root = filesystem(phase_uri)
    fs.invalidate_cache()  # another process may have written since this instance last listed
    names = {path.split("/")[-2] for path in fs.glob(f"{root.rstrip('/')}/checkpoints/samples_*/meta.json")}
    return [
        join(phase_uri, "checkpoints", name) for name in sorted(names, key=lambda n: int(n.removeprefix("samples_")))
    ]


def upload_tree(local_dir: Path, uri: str, skip: Sequence[str] = (), last: Sequence[str] = ("meta.json",)) -> int:
    """Upload the files under `local_dir` to `uri`; return how many were sent.

    Resumable: an object already there with the same size is not sent again, so a retry after
    a kill only sends what is missing. Files named in `last` go after every other file (a
    checkpoint's meta.json marks it complete: it must never land before the weights). Paths
    starting with one of `skip` (relative, e.g. "state/") are left out.
    """
    fs, root = filesystem(uri)
    root = root.rstrip("/")
    fs.invalidate_cache(root)  # another process (a killed attempt) may have written since we listed
    present = {path.rstrip("/"): info.get("size") for path, info in fs.find(root, detail=True).items()}
    files = [
        p
        for p in local_dir.rglob("*")
        if p.is_file() and not p.relative_to(local_dir).as_posix().startswith(tuple(skip))
    ]
    sent = 0
    for path in sorted(files, key=lambda p: (p.name in last, p.as_posix())):
        target = f"{root}/{path.relative_to(local_dir).as_posix()}"
        if present.get(target) != path.stat().st_size:
            fs.put_file(str(path), target)  # file by file: fs.put on a directory nests it (NOTES)
            sent += 1
    return sent


def download_tree(uri: str, local_dir: Path, last: Sequence[str] = ("meta.json",)) -> int:
    """Mirror of `upload_tree`: fetch what is missing locally, files in `last` after the rest,
    each through a temporary name, so a killed download never leaves a complete-looking copy."""
    fs, root = filesystem(uri)
    root = root.rstrip("/")
    fetched = 0
    remote = fs.find(root, detail=True)
    for path in sorted(remote, key=lambda p: (p.rsplit("/", 1)[-1] in last, p)):
        target = local_dir / path[len(root) + 1 :]
        if target.exists() and target.stat().st_size == remote[path].get("size"):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part")
        fs.get_file(path, str(tmp))
        os.replace(tmp, target)
        fetched += 1
    return fetched


def remove_tree(uri: str, first: Sequence[str] = ("meta.json",)) -> None:
    """Delete every object under `uri`, files named in `first` before the rest: a checkpoint
    interrupted mid-delete then reads as incomplete, never as complete with missing files."""
    fs, root = filesystem(uri)
    for path in sorted(fs.find(root.rstrip("/")), key=lambda p: p.rsplit("/", 1)[-1] not in first):
        fs.rm_file(path)


def local_checkpoint(uri: str) -> str:
    """A local directory holding the model at `uri` (embedded asset, local path or remote
    checkpoint). A remote checkpoint is used from its mirror when complete there (the staging
    copy it was trained into), else downloaded; one without meta.json is refused."""
    if uri.startswith(EMBEDDED) or is_local(uri):
        return resolve_embedded(uri)
    local = local_path(uri)
    if not (local / "meta.json").exists():
        if not exists(join(uri, "meta.json")):
            raise FileNotFoundError(f"{uri} has no meta.json: an incomplete checkpoint is never used")
        download_tree(uri, local)
    return str(local)


def resolve_embedded(uri: str) -> str:
    """Map embedded://base-model and embedded://curriculum/... to the built lab assets."""
    if not uri.startswith(EMBEDDED):
        return uri
    from embedded import build_assets  # builds once, then a cache hit

    assets = build_assets()
    rest = uri.removeprefix(EMBEDDED)
    if rest == "base-model":
        return str(assets.base_model_dir)
    if rest.startswith("curriculum/"):
        return str(assets.curriculum_dir / rest.removeprefix("curriculum/"))
    raise ValueError(f"unknown embedded asset {uri!r} (expected embedded://base-model or embedded://curriculum/...)")
