"""JSON files of circuits: read a dict or a path, write atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def read_json(source: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """``source`` as a dict: a mapping is copied, a path is read as JSON."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"No circuit file at {str(path)!r}.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{str(path)!r} is not valid JSON ({error}); is it a circuit file?"
        ) from None


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


__all__ = ["read_json", "write_atomically"]
