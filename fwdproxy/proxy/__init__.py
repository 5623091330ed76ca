"""One client connection: admission, handshakes, routing decisions, relay, access log."""
