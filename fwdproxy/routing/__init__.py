"""Routing policy, pure: the rule engine, the registry catalog, image references, explain."""
