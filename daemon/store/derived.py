"""Artifacts derived once from a model's files and kept in the store: a GGUF converted to
an HF folder, and (later) quantized weights. Each is built in a temporary folder and
renamed into place, under a file lock, so a crash or a second process never sees half of
one."""

from __future__ import annotations

import fcntl
import os
import shutil
import threading
from pathlib import Path
from typing import Callable

_COMPLETE = ".complete"


class DerivedCache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()

    def path(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str) -> Path | None:
        final = self.path(key)
        return final if (final / _COMPLETE).exists() else None

    def get_or_build(self, key: str, build: Callable[[Path], None]) -> Path:
        """The folder for `key`, calling build(tmp_folder) first if it does not exist."""
        done = self.get(key)
        if done is not None:
            return done
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self.root / f".{key}.lock", "w") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            done = self.get(key)
            if done is not None:
                return done
            tmp = self.root / f".{key}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                build(tmp)
                (tmp / _COMPLETE).write_text("")
                final = self.path(key)
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return final
