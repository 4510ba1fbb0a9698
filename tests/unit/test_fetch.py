"""Artifact fetching: file and http(s) URIs, digest verification, the on-disk cache of downloads."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamserve.control.fetch import fetch_verified, sha256_hex
from streamserve.errors import DigestMismatch, ModelError


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, str, list[str]]]:
    served = tmp_path / "served"
    served.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()
    thread.join()


def test_file_uri_and_path_with_digest_check(tmp_path: Path) -> None:
    artifact = tmp_path / "m.onnx"
    artifact.write_bytes(b"model-bytes")
    digest = sha256_hex(b"model-bytes")
    assert fetch_verified(str(artifact), digest) == (b"model-bytes", digest)
    assert fetch_verified(artifact.as_uri(), None) == (b"model-bytes", digest)
    with pytest.raises(DigestMismatch, match="sha256 mismatch"):
        fetch_verified(str(artifact), "0" * 64)
    with pytest.raises(ModelError, match="cannot read"):
        fetch_verified(str(tmp_path / "absent.onnx"), None)
    with pytest.raises(ModelError, match="no fetcher for s3"):
        fetch_verified("s3://bucket/m.onnx", None)


def test_http_download_is_verified_and_cached(http_dir: tuple[Path, str, list[str]], tmp_path: Path) -> None:
    served, base, requests = http_dir
    (served / "m.onnx").write_bytes(b"v2-bytes")
    digest = sha256_hex(b"v2-bytes")
    cache = tmp_path / "cache"
    assert fetch_verified(f"{base}/m.onnx", digest, cache) == (b"v2-bytes", digest)
    assert (cache / f"{digest}.onnx").read_bytes() == b"v2-bytes"
    assert fetch_verified(f"{base}/m.onnx", digest, cache) == (b"v2-bytes", digest)
    assert len(requests) == 1, "the second fetch came from the cache"
    (cache / f"{digest}.onnx").write_bytes(b"tampered")
    assert fetch_verified(f"{base}/m.onnx", digest, cache)[0] == b"v2-bytes", "a bad cached copy is refetched"
    with pytest.raises(DigestMismatch):
        fetch_verified(f"{base}/m.onnx", "f" * 64, cache)
    with pytest.raises(ModelError, match="cannot download"):
        fetch_verified(f"{base}/absent.onnx", None, cache)
