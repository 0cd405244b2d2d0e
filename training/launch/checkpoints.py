"""Checkpoint directories on disk: a checkpoint is complete once its meta.json landed (written last)."""

from __future__ import annotations

import shutil
from pathlib import Path

from core import records


def remove_incomplete_checkpoints(output_dir: Path) -> list[Path]:
    """Delete checkpoint directories that have no meta.json (a crash mid-save)."""
    removed = []
    for path in sorted((output_dir / "checkpoints").glob("samples_*")):
        if not (path / records.META).exists():
            shutil.rmtree(path)
            removed.append(path)
    return removed


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint directories with meta.json, ordered by samples seen."""
    found = [p for p in (output_dir / "checkpoints").glob("samples_*") if (p / records.META).exists()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("samples_")))


def prune_checkpoints(output_dir: Path, keep: str | None, policy: str) -> list[Path]:
    """Disk: after a phase's selection, delete its complete checkpoints except the winner.

    `keep` is the winner's path or URI (only its `samples_<N>` name is compared), or None when
    the phase's starting model won and none of its checkpoints is kept. Policy "none" deletes
    nothing. A winner that is not among the checkpoints is an error, not a reason to delete all.
    """
    if policy == "none":
        return []
    checkpoints = complete_checkpoints(output_dir)
    name = keep.rstrip("/").rsplit("/", 1)[-1] if keep else None
    if name is not None and name not in {p.name for p in checkpoints}:
        raise ValueError(
            f"selected checkpoint {keep!r} is not a complete checkpoint under {output_dir}; nothing deleted"
        )
    return delete_checkpoints([p for p in checkpoints if p.name != name])


def keep_last_checkpoints(output_dir: Path, n: int | None) -> list[Path]:
    """Disk during training: delete all but the newest `n` complete checkpoints (None: keep all)."""
    return delete_checkpoints(complete_checkpoints(output_dir)[:-n] if n else [])


def delete_checkpoints(paths: list[Path]) -> list[Path]:
    """meta.json first: a checkpoint interrupted mid-delete reads as incomplete, never as whole."""
    for path in paths:
        (path / records.META).unlink()
        shutil.rmtree(path)
    return paths
