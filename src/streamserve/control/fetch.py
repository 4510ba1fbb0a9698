"""Artifact fetching and digest verification; object stores plug in as another ArtifactFetcher."""

from __future__ import annotations

import hashlib
import logging
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Protocol

from streamserve.errors import ArtifactUnavailable, DigestMismatch, ModelError

log = logging.getLogger(__name__)


class ArtifactFetcher(Protocol):
    """Reads a model artifact's bytes from one kind of location."""

    def fetch(self, uri: str) -> bytes: ...


class FileFetcher:
    """file:// URIs and plain paths."""

    def fetch(self, uri: str) -> bytes:
        parsed = urllib.parse.urlparse(uri)
        path = Path(urllib.parse.unquote(parsed.path)) if parsed.scheme == "file" else Path(uri)
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ArtifactUnavailable(f"cannot read artifact {redact(uri)}: {exc.strerror}") from exc


class HttpFetcher:
    """http:// and https:// URIs."""

    def __init__(self, timeout_s: float = 60.0) -> None:
        self.timeout_s = timeout_s

    def fetch(self, uri: str) -> bytes:
        try:
            with urllib.request.urlopen(uri, timeout=self.timeout_s) as response:
                data: bytes = response.read()
                return data
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise ArtifactUnavailable(f"cannot download artifact {redact(uri)}: {_redact_text(str(exc), uri)}") from exc


FETCHERS: dict[str, ArtifactFetcher] = {
    "": FileFetcher(),
    "file": FileFetcher(),
    "http": HttpFetcher(),
    "https": HttpFetcher(),
}


def redact(uri: str) -> str:
    """The URI without credentials, query string or fragment: pre-signed URLs carry secrets there."""
    parsed = urllib.parse.urlparse(uri)
    if not parsed.scheme:
        return uri
    netloc = parsed.hostname or ""
    if parsed.port is not None:
        netloc += f":{parsed.port}"
    if parsed.username or parsed.password:
        netloc = "***@" + netloc
    suffix = "?***" if parsed.query or parsed.fragment else ""
    return urllib.parse.urlunparse((parsed.scheme, netloc, parsed.path, "", "", "")) + suffix


def _redact_text(text: str, uri: str) -> str:
    return text.replace(uri, redact(uri))


def fetch(uri: str) -> bytes:
    """The artifact's bytes, by the fetcher registered for its scheme."""
    scheme = urllib.parse.urlparse(uri).scheme
    fetcher = FETCHERS.get(scheme)
    if fetcher is None:
        raise ModelError(f"no fetcher for {scheme}:// URIs (have {sorted(s for s in FETCHERS if s)})")
    return fetcher.fetch(uri)


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def fetch_verified(uri: str, expected_sha256: str | None, cache_dir: Path | None = None) -> tuple[bytes, str]:
    """Fetch an artifact and check its digest when one is announced; returns bytes and digest.

    Verified remote artifacts are kept in cache_dir under their digest, so a restarted worker (or a
    rollback after eviction) does not download them again; a cached copy is verified like a download.
    """
    remote = urllib.parse.urlparse(uri).scheme in ("http", "https")
    cached = cache_dir / f"{expected_sha256.lower()}.onnx" if cache_dir and remote and expected_sha256 else None
    if cached is not None and cached.is_file():
        data = cached.read_bytes()
        if sha256_hex(data) == expected_sha256:
            return data, sha256_hex(data)
    data = fetch(uri)
    digest = sha256_hex(data)
    if expected_sha256 and digest != expected_sha256.lower():
        raise DigestMismatch(redact(uri), expected_sha256, digest)
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_suffix(".partial")
            partial.write_bytes(data)
            partial.replace(cached)
        except OSError as exc:  # a cache that cannot be written only costs a download next time
            log.warning("cannot cache %s in %s: %s", redact(uri), cache_dir, exc)
    return data, digest
