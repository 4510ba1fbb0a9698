"""Ed25519 signatures of model announcements, and the set of public keys a worker trusts.

A public key is written as one line ``ed25519:<base64 of the 32 raw bytes>`` so it fits an env var, a
YAML list or a Kubernetes secret; its id is the first 16 hex digits of the sha256 of the raw bytes. A
private key is a PKCS#8 PEM file, readable by its owner only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from streamserve.control.announcements import ModelAnnouncement
from streamserve.errors import ConfigError

PUBLIC_PREFIX = "ed25519:"


def key_id(public: Ed25519PublicKey) -> str:
    """Short stable id of a public key."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def format_public(public: Ed25519PublicKey) -> str:
    """``ed25519:<base64>``: the one-line form of a trusted key."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PUBLIC_PREFIX + base64.b64encode(raw).decode()


def parse_public(text: str) -> Ed25519PublicKey:
    """A public key from its one-line form; raises ConfigError when malformed."""
    text = text.strip()
    if not text.startswith(PUBLIC_PREFIX):
        raise ConfigError(f"a trusted key must look like '{PUBLIC_PREFIX}<base64>', got {text[:24]!r}")
    try:
        raw = base64.b64decode(text[len(PUBLIC_PREFIX) :], validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"malformed ed25519 public key {text[:24]!r}...: {exc}") from exc


def generate(private_path: Path) -> tuple[Path, str]:
    """Write a new private key (mode 0600) and its public line next to it (``.pub``); never overwrites."""
    if private_path.exists():
        raise ConfigError(f"{private_path} exists; refusing to overwrite a signing key")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    private_path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pem)
    public_line = format_public(private.public_key())
    public_path = private_path.with_name(private_path.name + ".pub")
    public_path.write_text(public_line + "\n")
    return public_path, public_line


def load_private(path: Path) -> Ed25519PrivateKey:
    """A signing key from its PEM file."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read signing key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 private key")
    return key


def sign(announcement: ModelAnnouncement, private: Ed25519PrivateKey) -> ModelAnnouncement:
    """The announcement with key id and signature over its canonical form."""
    unsigned = replace(announcement, key_id=key_id(private.public_key()), signature=None)
    return replace(unsigned, signature=private.sign(unsigned.canonical()))


@dataclass(frozen=True)
class TrustedKeys:
    """The public keys whose announcements a worker accepts (several at once during a rotation)."""

    keys: dict[str, Ed25519PublicKey]

    @classmethod
    def parse(cls, lines: Iterable[str]) -> TrustedKeys:
        """From one-line keys; blank lines and ``#`` comments are skipped."""
        keys = {}
        for line in lines:
            line = line.split("#", 1)[0].strip()
            if line:
                public = parse_public(line)
                keys[key_id(public)] = public
        return cls(keys)

    @classmethod
    def load(cls, inline: Iterable[str], file: Path | None) -> TrustedKeys:
        """Inline keys plus the lines of a key file (e.g. a mounted Kubernetes secret)."""
        lines = list(inline)
        if file is not None:
            try:
                lines += file.expanduser().read_text().splitlines()
            except OSError as exc:
                raise ConfigError(f"cannot read trusted keys file {file}: {exc.strerror}") from exc
        return cls.parse(lines)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def with_key(self, public: Ed25519PublicKey) -> TrustedKeys:
        """These keys and one more."""
        return TrustedKeys({**self.keys, key_id(public): public})

    def check(self, announcement: ModelAnnouncement) -> str | None:
        """None when a trusted key signed exactly this announcement, else why not."""
        if announcement.signature is None or announcement.key_id is None:
            return "unsigned announcement (signatures are required)"
        public = self.keys.get(announcement.key_id)
        if public is None:
            return f"signed by untrusted key {announcement.key_id} (trusted: {', '.join(sorted(self.keys))})"
        try:
            public.verify(announcement.signature, announcement.canonical())
        except InvalidSignature:
            return f"bad signature for key {announcement.key_id}: forged, or a field was changed after signing"
        return None
