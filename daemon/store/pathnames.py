"""Names that become paths in the store: checked before they are joined to a folder.

Everything here comes from outside the daemon: a Hub server (or a mirror behind HF_ENDPOINT)
names revisions, commits, files and blob ids; a modelfile names a repo and a revision; a
manifest on disk names all of them again. None of it may climb out of the store (`..`, an
absolute path, a drive letter, a backslash) or hide a NUL, so each is checked by the rule of
what it is, and a name that breaks it is refused with UnsafeName before any file is written.
"""

from __future__ import annotations

import re

from daemon.errors import InternalError

_HEX40 = re.compile(r"[0-9a-f]{40}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
# Hub repo ids: org/name, each part as the Hub allows (huggingface_hub's validate_repo_id)
_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
# a git ref name part: no control characters, spaces or the characters git forbids
_REF_PART = re.compile(r"[^\x00-\x20\x7f~^:?*\[\\]+")


class UnsafeName(InternalError):
    """A name from a server, a modelfile or a manifest that must not become a path."""


def _refuse(what: str, value: object, why: str) -> UnsafeName:
    return UnsafeName(f"refusing {what} {value!r}: {why}")


def relative_path(value: object, what: str = "file path") -> str:
    """A path inside a model's folder: relative, `/`-separated, no `.` or `..` parts."""
    if not isinstance(value, str) or not value:
        raise _refuse(what, value, "not a non-empty string")
    if "\x00" in value or "\\" in value:
        raise _refuse(what, value, "it holds a NUL or a backslash")
    if value.startswith("/") or re.match(r"[A-Za-z]:", value):
        raise _refuse(what, value, "it is absolute")
    parts = value.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise _refuse(what, value, "it has an empty, '.' or '..' part")
    return value


def revision(value: object) -> str:
    """A branch, tag or commit name (`main`, `v1.0`, `refs/pr/1`): the ref file's path."""
    if not isinstance(value, str) or not value or len(value) > 255:
        raise _refuse("revision", value, "not a name of 1 to 255 characters")
    parts = value.split("/")
    if any(part in ("", ".", "..") or part.endswith(".lock") or not _REF_PART.fullmatch(part) for part in parts):
        raise _refuse("revision", value, "not a git ref name")
    return value


def commit(value: object) -> str:
    """A commit id: 40 lower-case hex digits."""
    if not isinstance(value, str) or not _HEX40.fullmatch(value):
        raise _refuse("commit", value, "not 40 hex digits")
    return value


def blob_id(value: object) -> str:
    """A blob's name in the hub cache: an LFS sha256 (64 hex) or a git blob id (40 hex)."""
    if not isinstance(value, str) or not (_HEX64.fullmatch(value) or _HEX40.fullmatch(value)):
        raise _refuse("blob id", value, "not a sha256 or a git object id")
    return value


def repo_id(value: object) -> str:
    """A Hub repository, `org/name`."""
    if not isinstance(value, str) or value.count("/") != 1 or \
            not all(_REPO_PART.fullmatch(p) and ".." not in p for p in value.split("/")):
        raise _refuse("repository", value, "not of the form org/name")
    return value


def folder_id(value: object) -> str:
    """A created model's folder under files/: hex digits."""
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{16,64}", value):
        raise _refuse("folder id", value, "not hex digits")
    return value
