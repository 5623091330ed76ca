"""fwdproxy: a split-routing forward proxy for container hosts."""

__version__ = "0.1.0"
