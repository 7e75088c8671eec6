"""Workdirs and data folders may be local paths or URIs (`gs://bucket/run` on Cloud TPU VMs).

Every file the jobs write or read goes through `resolve`, which returns an `etils.epath.Path`
(what orbax uses too): `~` and relative local paths are made absolute, URIs pass through
unchanged. `os.path` is never applied to a URI.
"""

from __future__ import annotations

import os

from etils import epath


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> epath.Path:
    """A local path made absolute (with `~` expanded), or a URI unchanged, as an epath.Path."""
    if is_uri(path):
        return epath.Path(os.fspath(path))
    return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
