"""Stdlib-only basics every layer uses: host/port parsing, the error types, outcomes."""
