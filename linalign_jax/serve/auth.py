"""Bearer-token checks and TLS credentials for the HELIX provider and client."""
from __future__ import annotations

import hmac
from pathlib import Path

import grpc

from linalign_jax.errors import LinalignError

METADATA_KEY = "authorization"
MIN_TOKEN_CHARS = 16


def load_token(token: str | None = None, token_file: str | None = None) -> str:
    """The shared secret from a flag or (preferred: keeps it out of `ps`) a file; exactly one must be given."""
    if bool(token) == bool(token_file):
        raise LinalignError("give exactly one of --token or --token_file (a file keeps the secret out of `ps`)")
    if token_file:
        path = Path(token_file)
        if not path.is_file():
            raise LinalignError(f"token file {token_file} does not exist")
        token = path.read_text().strip()
    if len(token) < MIN_TOKEN_CHARS or not token.isprintable() or " " in token:
        raise LinalignError(f"the bearer token must be at least {MIN_TOKEN_CHARS} printable characters without "
                            f"spaces (got {len(token)} characters); generate one with `openssl rand -hex 32`")
    return token


def call_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return ((METADATA_KEY, f"Bearer {token}"),)


def is_authorized(metadata, token: str) -> bool:
    """Constant-time comparison of the presented bearer token with ours."""
    presented = dict(metadata or ()).get(METADATA_KEY, "")
    expected = f"Bearer {token}"
    return hmac.compare_digest(presented.encode("utf-8", "replace"), expected.encode("utf-8"))


def server_credentials(cert_file: str, key_file: str) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(_read(key_file, "TLS key"), _read(cert_file, "TLS certificate"))])


def channel_credentials(ca_file: str) -> grpc.ChannelCredentials:
    """Trust exactly the given CA (or self-signed provider certificate)."""
    return grpc.ssl_channel_credentials(root_certificates=_read(ca_file, "TLS CA certificate"))


def _read(path: str, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise LinalignError(f"{what} file {path} does not exist")
    data = p.read_bytes()
    if b"-----BEGIN" not in data:
        raise LinalignError(f"{what} file {path} is not PEM (no '-----BEGIN' line)")
    return data
