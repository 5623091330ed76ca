"""The NEED_DATA sentinel shared by every sans-IO parser in this package.

One singleton (not a per-module one) so that callers can compare with `is NEED_DATA` no matter
which parser returned it.
"""

from __future__ import annotations

from typing import Final

__all__ = ["NEED_DATA", "NeedData"]


class NeedData:
    """Type of NEED_DATA: "feed more bytes with receive_data() and ask again"."""

    __slots__ = ()
    _instance: NeedData | None = None

    def __new__(cls) -> NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()
