"""huggingface_hub's cache layout, kept inside the store (`$OLLAMA_MODELS/hub`), so pulled
files are one copy that both hfollama and huggingface_hub/transformers understand:

    hub/models--org--name/blobs/<etag>                   the file (etag: LFS sha256 or git oid)
    hub/models--org--name/blobs/<etag>.incomplete        a partial download, resumable
    hub/models--org--name/snapshots/<commit>/<path>      relative symlink to ../../blobs/<etag>
    hub/models--org--name/refs/<revision>                the commit a branch pointed at

Every name joined into a path here (they come from the Hub) is checked first (pathnames.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from daemon.store import pathnames
from daemon.store.manifests import write_atomic


class HubCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def repo_dir(self, repo: str) -> Path:
        return self.root / ("models--" + pathnames.repo_id(repo).replace("/", "--"))

    def blob(self, repo: str, etag: str) -> Path:
        return self.repo_dir(repo) / "blobs" / pathnames.blob_id(etag)

    def partial(self, repo: str, etag: str) -> Path:
        return self.repo_dir(repo) / "blobs" / f"{pathnames.blob_id(etag)}.incomplete"

    def snapshot(self, repo: str, commit: str) -> Path:
        return self.repo_dir(repo) / "snapshots" / pathnames.commit(commit)

    def link(self, repo: str, commit: str, path: str, etag: str) -> Path:
        """Point snapshots/<commit>/<path> at the blob (atomically replacing any old link)."""
        target, blob = self.snapshot(repo, commit) / pathnames.relative_path(path), self.blob(repo, etag)
        target.parent.mkdir(parents=True, exist_ok=True)
        relative = os.path.relpath(blob, target.parent)
        tmp = target.with_name(f".{target.name}.link")
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(relative, tmp)
        os.replace(tmp, target)
        return target

    def set_ref(self, repo: str, revision: str, commit: str) -> None:
        if revision != pathnames.commit(commit):
            write_atomic(self.repo_dir(repo) / "refs" / pathnames.revision(revision), commit.encode())
