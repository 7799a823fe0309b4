"""The bytes on the wire: one `linalign_jax.helix.frames` frame per gRPC message (the same format the engine uses for
its ciphertexts and key bundles), so no protobuf compiler step is needed and there is one header validator."""
from linalign_jax.helix.frames import MAGIC, MAX_HEADER_BYTES, VERSION, Frame, WireError, decode, encode, require

__all__ = ["MAGIC", "MAX_HEADER_BYTES", "VERSION", "Frame", "WireError", "decode", "encode", "require"]
