"""Outgoing connections and moving bytes: dials, upstream groups, the relay."""
