"""Sans-IO protocol parsers: bytes in, typed events or ProtocolError out."""
