"""The registry mirror: the OCI pull API for every runtime, backed by the layer cache, with
every upstream fetch routed by the proxy's rules."""
