"""Transports: the I/O edge of holysheep (sync on requests, async on httpx)."""

__all__: list[str] = []
