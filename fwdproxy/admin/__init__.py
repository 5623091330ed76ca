"""The admin listener: HTTP API, Prometheus metrics and the dashboard (aiohttp)."""
