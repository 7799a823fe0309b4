"""HELIX between two processes: the provider's gRPC service and the client's transport (raw-bytes frames, sessions,
bearer-token auth, optional TLS, limits), plus the client's two jobs against a provider (`parties`).

Modules: `wire` (frames), `sessions` (provider session table), `auth` (token, TLS), `server` (`ProviderServer`),
`client` (`ProviderClient`, `RemoteSession`, `RemoteError`), `heads` (head files and fitted-head store), `parties`
(`classify`, `secure_fit`). The cryptographic side of every message is `linalign_jax.helix.protocol`.
"""
