"""World roots every node of a cluster can reach: `s3://`, `gs://` (and any URI pyarrow.fs knows), as Ray Train's
`storage_path` takes them. `Store` is a flat key -> bytes view of one root (keys are `/`-separated paths under it):
whole-object writes (an object store makes each PUT atomic, so nothing here renames or appends), ranged reads,
listings and deletes. `worldgen.storage.WorldStorage` builds a world's layout on it.

    s3://bucket/worlds/harbor                                  AWS: credentials from the usual AWS settings
    s3://bucket/worlds/harbor?endpoint_override=host:9000&scheme=http   an S3-compatible server (MinIO, moto, Ceph)
    gs://bucket/worlds/harbor                                  Google Cloud Storage

Query parameters are pyarrow's (`S3FileSystem.from_uri`: region, endpoint_override, scheme, anonymous, ...).
Opening a store checks that it answers (`check`): an unknown scheme, missing credentials and an unreachable store
are each a StoreError naming the root and the setting to fix, before any world step starts.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from worldgen.errors import ConfigError

__all__ = ["Store", "StoreError", "child_uri", "is_uri", "local_path", "open_store"]

# Schemes that are local paths, not stores.
_LOCAL_SCHEMES = {"", "file"}
# AWS's credential chain, as the SDK inside pyarrow reads it (env, shared files, web identity, containers).
_AWS_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_PROFILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)
_AWS_ENV_RELATIVE = "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"
_IMDS = ("169.254.169.254", 80)  # EC2 instance metadata: an instance role's credentials


class StoreError(ConfigError):
    """A world root URI that cannot be used: no filesystem for its scheme, no credentials, the store does not
    answer. Its message names the root and the setting (`setting`: where the root came from)."""


def is_uri(root: str | os.PathLike[str]) -> bool:
    """True for a store URI (`s3://...`), False for a local path (also `file://...`)."""
    text = os.fspath(root)
    return "://" in text and urlsplit(text).scheme.lower() not in _LOCAL_SCHEMES


def local_path(root: str | os.PathLike[str]) -> Path:
    """A local root as a path (`file:///x` -> /x)."""
    text = os.fspath(root)
    return Path(urlsplit(text).path) if text.startswith("file://") else Path(text)


def open_store(uri: str, *, setting: str = "the world root", check: bool = True) -> Store:
    """The store behind `uri`, checked (unless `check=False`) to answer with the credentials this process has."""
    store = Store(uri, setting=setting)
    if check:
        store.check()
    return store


class Store:
    """Keys under one store root. Every method raises StoreError (never a bare pyarrow error) on failure, except
    `get`/`size`, which return None for a key that does not exist."""

    def __init__(self, uri: str, *, setting: str = "the world root"):
        self.uri, self.setting = uri.rstrip("/"), setting
        scheme = urlsplit(uri).scheme.lower()
        if scheme in ("s3", "s3a"):
            self._check_aws_credentials()
        try:
            self.fs, base = _filesystem(self.uri)
        except Exception as err:  # ArrowInvalid / ArrowNotImplementedError / ValueError from pyarrow
            text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if "Unrecognized filesystem" in text or "not implemented" in text.lower():
                text = (
                    f"no filesystem is installed for the scheme '{scheme}://' (pyarrow.fs knows s3://, gs://, "
                    "hdfs:// and local paths)"
                )
            raise self._error(text) from None
        self.base = base.rstrip("/")

    def __repr__(self) -> str:
        return f"Store({self._shown()!r})"

    # ---- errors -----------------------------------------------------------------------------------------
    def _error(self, problem: str) -> StoreError:
        return StoreError(f"{self.setting} {self._shown()!r}: {problem}")

    def _shown(self) -> str:
        """The URI without its query (an endpoint may carry credentials in the userinfo: never shown)."""
        parts = urlsplit(self.uri)
        host = parts.hostname or ""
        return f"{parts.scheme}://{host}{parts.path}"

    def _failed(self, doing: str, err: Exception) -> StoreError:
        text = " ".join(str(err).split())
        lowered = text.lower()
        if any(
            s in lowered for s in ("access denied", "accessdenied", "invalidaccesskeyid", "signature", "403")
        ):
            hint = (
                "the credentials were refused: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the role)"
            )
        elif (
            "nosuchbucket" in lowered
            or "no such bucket" in lowered
            or ("bucket" in lowered and "not found" in lowered)
        ):
            hint = "the bucket does not exist: create it first"
        elif any(s in lowered for s in ("connect", "resolve", "timed out", "timeout", "unreachable", "curl")):
            hint = "the store does not answer: check the endpoint (endpoint_override=) and the network"
        else:
            hint = ""
        return self._error(f"cannot {doing} ({text[:300]}){'; ' + hint if hint else ''}")

    def _check_aws_credentials(self) -> None:
        """Refuse at once when no AWS credential source is configured, instead of the SDK's slow lookups and an
        unsigned request the store rejects with a confusing message."""
        if urlsplit(self.uri).username:
            raise self._error(
                "credentials in the URI would be written wherever the world's location is (logs, actor names): "
                "give them in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) instead"
            )
        if any(os.environ.get(name) for name in (*_AWS_ENV, _AWS_ENV_RELATIVE)):
            return
        files = [os.environ.get("AWS_SHARED_CREDENTIALS_FILE"), os.environ.get("AWS_CONFIG_FILE")]
        home = Path.home() / ".aws"
        files += [str(home / "credentials"), str(home / "config")]
        if any(f and Path(f).is_file() for f in files):
            return
        if os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true" and _answers(*_IMDS, 0.3):
            return  # an EC2 instance: its role's credentials come from the metadata service
        raise self._error(
            "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the "
            "environment of every node (Ray workers inherit it from `ray start`), or give the nodes an "
            "instance role"
        )

    # ---- keys --------------------------------------------------------------------------------------------
    def _path(self, key: str) -> str:
        return f"{self.base}/{key.strip('/')}" if key.strip("/") else self.base

    def check(self) -> None:
        """Fail now, naming the setting, when the store does not answer or refuses these credentials."""
        try:
            self.fs.get_file_info(self._path("world.yaml"))
        except Exception as err:
            raise self._failed("reach the store", err) from None

    def put(self, key: str, data: bytes) -> None:
        """Write one object whole (visible all at once, or not at all)."""
        try:
            with self.fs.open_output_stream(self._path(key)) as out:
                out.write(data)
        except Exception as err:
            raise self._failed(f"write {key}", err) from None

    def put_file(self, key: str, source: Path) -> None:
        self.put(key, Path(source).read_bytes())

    def get(self, key: str, start: int = 0, stop: int | None = None) -> bytes | None:
        """The object's bytes (or [start, stop)); None when it does not exist. A slice is one ranged read."""
        try:
            if start == 0 and stop is None:
                with self.fs.open_input_stream(self._path(key)) as fh:
                    return fh.read()
            with self.fs.open_input_file(self._path(key)) as fh:
                size = fh.size()
                begin = min(max(0, start), size)
                end = size if stop is None else min(max(begin, stop), size)
                return fh.read_at(end - begin, begin) if end > begin else b""
        except FileNotFoundError:
            return None
        except Exception as err:
            if _missing(err):
                return None
            raise self._failed(f"read {key}", err) from None

    def size(self, key: str) -> int | None:
        import pyarrow.fs as pafs

        info = self._info(key)
        return info.size if info.type == pafs.FileType.File else None

    def exists(self, key: str) -> bool:
        import pyarrow.fs as pafs

        return self._info(key).type == pafs.FileType.File

    def _info(self, key: str) -> Any:  # a pyarrow FileInfo
        try:
            return self.fs.get_file_info(self._path(key))
        except Exception as err:
            raise self._failed(f"look up {key}", err) from None

    def list(self, prefix: str = "", *, recursive: bool = False) -> list[str]:
        """Keys of the objects under `prefix` (relative to the root, sorted); with `recursive=False` only those
        directly under it (and the names of the 'folders' there, ending in '/')."""
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self._path(prefix), allow_not_found=True, recursive=recursive)
        try:
            infos = self.fs.get_file_info(selector)
        except Exception as err:
            raise self._failed(f"list {prefix or 'the root'}", err) from None
        keys = []
        for info in infos:
            key = info.path[len(self.base) :].strip("/")
            if info.type == pafs.FileType.File:
                keys.append(key)
            elif info.type == pafs.FileType.Directory and not recursive:
                keys.append(key + "/")
        return sorted(keys)

    def delete(self, key: str) -> None:
        try:
            self.fs.delete_file(self._path(key))
        except Exception as err:
            if not _missing(err):
                raise self._failed(f"delete {key}", err) from None

    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under `prefix` (a 'folder')."""
        for key in self.list(prefix, recursive=True):
            self.delete(key)


def child_uri(uri: str, name: str) -> str:
    """`uri` with `/name` added to its path (the query stays at the end)."""
    scheme, netloc, path, query, fragment = urlsplit(uri)
    return urlunsplit((scheme, netloc, f"{path.rstrip('/')}/{name.strip('/')}", query, fragment))


@functools.lru_cache(maxsize=64)
def _filesystem(uri: str) -> tuple[Any, str]:
    """pyarrow's filesystem for a URI, made once per process (making one may ask the store for the bucket's
    region); pyarrow filesystems are safe to share between threads."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri)


def _missing(err: Exception) -> bool:
    text = str(err).lower()
    return isinstance(err, FileNotFoundError) or "not found" in text or "nosuchkey" in text or "404" in text


def _answers(host: str, port: int, timeout: float) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True
