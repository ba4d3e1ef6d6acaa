"""Pulling a model: from a name to verified files in the store and a manifest.

`plan_pull` resolves the name (a modelfile tag with a repo source, or `hf.co/<org>/<repo>`
with an optional quantization tag, as Ollama pulls Hub repos) and asks the Hub through
huggingface_hub for the commit and the file list with sizes and sha256. `pull_events`
then downloads each file and yields Ollama's progress objects:

    {"status": "pulling manifest"}
    {"status": "pulling 6a0746a1ec1a", "digest": "sha256:6a07…", "total": N, "completed": M}  (per file, ≤ every 0.1 s)
    {"status": "verifying sha256 digest"}
    {"status": "writing manifest"}
    {"status": "success"}

The manifest is written last, only when every file is complete and verified.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import logging
import re
from dataclasses import dataclass
from typing import Any, AsyncIterator

from daemon.errors import InternalError
from daemon.names import ModelName
from daemon.registry.modelfile import Modelfile, Quantization, Source
from daemon.store import pathnames
from daemon.store.download import RemoteFile, Transfer

log = logging.getLogger(__name__)

HUB_HOSTS = ("hf.co", "huggingface.co")
PROGRESS_INTERVAL = 0.1

# What a model needs: weights, config, tokenizer, generation config, chat template, and
# sentence-transformers' pooling files. Never the original/ checkpoints or other formats.
WANTED = ("*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
          "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
          "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
          "chat_template.json", "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
          "1_Pooling/config.json", "2_Normalize/*")
FALLBACK_WEIGHTS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
EXCLUDED_DIRS = ("original/", "onnx/", "openvino/", "coreml/", "tf/", "flax/")


class PullError(InternalError):
    """Any pull failure: Ollama answers them with 500 when not streaming."""


def file_missing(detail: str) -> PullError:
    return PullError(f"pull model manifest: file does not exist ({detail})")


@dataclass(frozen=True)
class PullPlan:
    name: ModelName
    modelfile: Modelfile  # the settings the pulled model runs with
    repo: str
    revision: str
    commit: str
    files: tuple[RemoteFile, ...]
    gguf: str | None
    from_modelfile: bool  # pulled through a modelfile tag (its live settings keep applying)
    license: str = ""


def select_files(paths: list[str]) -> list[str]:
    def wanted(path: str, patterns: tuple[str, ...]) -> bool:
        if path.startswith(EXCLUDED_DIRS):
            return False
        return any(fnmatch.fnmatch(path, p) for p in patterns)

    chosen = [p for p in paths if wanted(p, WANTED)]
    if not any(p.endswith(".safetensors") for p in chosen):
        chosen += [p for p in paths if wanted(p, FALLBACK_WEIGHTS)]
    return sorted(chosen)


def choose_gguf(paths: list[str], tag: str) -> str | None:
    """Ollama's hf.co/<repo>:<quant>: the GGUF whose name carries the quantization."""
    ggufs = sorted(p for p in paths if p.endswith(".gguf") and not p.startswith(EXCLUDED_DIRS))
    if not ggufs:
        return None
    if tag.lower() == "latest":
        for preferred in ("q4_k_m", "q4_0", "q8_0"):
            for p in ggufs:
                if preferred in p.lower():
                    return p
        return ggufs[0]
    pattern = re.compile(rf"(^|[^a-z0-9_]){re.escape(tag.lower())}([^a-z0-9_]|$)")
    for p in ggufs:
        if pattern.search(p.lower().rsplit("/", 1)[-1].removesuffix(".gguf")):
            return p
    return None


def _hub_modelfile(name: ModelName, repo: str, is_gguf: bool) -> Modelfile:
    """Settings for a Hub repo pulled by hf.co name: a tag may choose load-time quantization."""
    tag = name.tag.lower()
    quantization = Quantization()
    if not is_gguf and tag in ("nf4", "fp4", "int8"):
        quantization = Quantization(mode=tag, double_quant=tag != "int8")
    return Modelfile(name=name, source=Source(kind="repo", repo=repo), quantization=quantization)


def plan_pull(name: ModelName, modelfile: Modelfile | None, api: Any, endpoint: str) -> PullPlan:
    """Blocking: ask the Hub what to download (run it off the event loop)."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if modelfile is not None and modelfile.source.kind == "repo":
        repo, revision, gguf_file, from_modelfile = modelfile.source.repo, modelfile.source.revision, modelfile.source.gguf, True
    elif name.host.lower() in HUB_HOSTS:
        repo, revision, gguf_file, from_modelfile = f"{name.namespace}/{name.model}", "main", None, False
    else:
        raise PullError("pull model manifest: file does not exist")
    pathnames.repo_id(repo)
    pathnames.revision(revision)
    try:
        info = api.model_info(repo, revision=revision, files_metadata=True)
    except GatedRepoError:
        raise PullError(gated_message(repo)) from None
    except RevisionNotFoundError:
        raise file_missing(f"hf.co/{repo} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise file_missing(f"hf.co/{repo} was not found; if it is private, set HF_TOKEN to a token that can read "
                           "it") from None
    except Exception as exc:  # the Hub (or the mirror) could not be reached, or answered nonsense
        raise PullError(f"pull model manifest: could not reach the Hub at {endpoint}: {_reason(exc)}") from None
    siblings = {s.rfilename: s for s in info.siblings or ()}
    paths = list(siblings)
    if modelfile is None or modelfile.source.kind != "repo":
        gguf_file = choose_gguf(paths, name.tag) if not any(p.endswith(".safetensors") for p in paths) else None
        if not any(p.endswith((".safetensors", ".bin")) for p in paths) and gguf_file is None:
            raise file_missing(f"hf.co/{repo} has no weights for tag {name.tag!r}")
        modelfile = _hub_modelfile(name, repo, gguf_file is not None)
    if gguf_file:
        if gguf_file not in siblings:
            raise file_missing(f"hf.co/{repo} has no file {gguf_file!r}")
        chosen = [gguf_file]
    else:
        chosen = select_files(paths)
        if not any(p.endswith((".safetensors", ".bin")) for p in chosen):
            raise file_missing(f"hf.co/{repo} has no safetensors weights")
    if not info.sha:
        raise PullError(f"pull model manifest: the Hub at {endpoint} did not say which commit {revision!r} is")
    commit = pathnames.commit(info.sha)
    files = []
    for path in chosen:
        pathnames.relative_path(path)  # names from the server: checked before any becomes a path
        s = siblings[path]
        lfs = getattr(s, "lfs", None)
        size = (lfs.size if lfs else None) or s.size
        if size is None:
            raise PullError(f"pull model manifest: the Hub did not report the size of {path}")
        remote = RemoteFile(repo=repo, commit=commit, path=path, size=int(size),
                            url=hf_hub_url(repo, path, revision=commit, endpoint=endpoint),
                            sha256=lfs.sha256 if lfs else None, git_oid=getattr(s, "blob_id", None))
        pathnames.blob_id(remote.etag)
        files.append(remote)
    # small files first: they are fast, and config errors show before gigabytes move
    files.sort(key=lambda f: (f.sha256 is not None, f.path))
    card = getattr(info, "card_data", None) or {}
    license_text = str(card.get("license", "")) if hasattr(card, "get") else ""
    return PullPlan(name=name, modelfile=modelfile, repo=repo, revision=revision, commit=commit,
                    files=tuple(files), gguf=gguf_file, from_modelfile=from_modelfile, license=license_text)


def _reason(exc: BaseException) -> str:
    """What went wrong, in a line: the innermost cause (Connection refused), not a traceback."""
    for _ in range(16):  # chains are short; a cycle must not hang us
        inner = exc.__cause__ or exc.__context__
        if inner is None:
            break
        exc = inner
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text.splitlines()[0]


def gated_message(repo: str) -> str:
    return (f"pull model manifest: hf.co/{repo} is gated: accept its license at https://huggingface.co/{repo} "
            "and set HF_TOKEN (in the daemon's environment) to a token of that account")


def progress_line(file: RemoteFile, transfer: Transfer) -> dict[str, Any]:
    digest = transfer.sha256 or file.sha256 or hashlib.sha256(file.etag.encode()).hexdigest()
    line: dict[str, Any] = {"status": f"pulling {digest[:12]}", "digest": f"sha256:{digest}", "total": file.size}
    if transfer.completed > 0:
        line["completed"] = transfer.completed
    return line


async def watch(file: RemoteFile, transfer: Transfer) -> AsyncIterator[dict[str, Any]]:
    """Progress lines for one transfer until it ends; raises its error."""
    last = None
    while not transfer.done.is_set():
        line = progress_line(file, transfer)
        if line != last:
            yield line
            last = line
        await asyncio.sleep(PROGRESS_INTERVAL)
    if transfer.error is not None:
        error = transfer.error
        if isinstance(error, InternalError):
            raise error
        raise PullError(describe_transfer_error(file, error)) from None
    yield progress_line(file, transfer)


def describe_transfer_error(file: RemoteFile, error: BaseException) -> str:
    names = {c.__name__ for c in type(error).__mro__}
    if "GatedRepoError" in names:
        return gated_message(file.repo)
    if "RepositoryNotFoundError" in names or "RemoteEntryNotFoundError" in names or "EntryNotFoundError" in names:
        return f"pull model manifest: file does not exist ({file.path} in hf.co/{file.repo})"
    if isinstance(error, OSError) and getattr(error, "errno", None) is not None:
        return f"{file.path}: {error.strerror or error}"
    return f"{file.path}: {error}"
