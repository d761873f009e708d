"""`timeout()`: asyncio.timeout on Python 3.11+, async_timeout (aiohttp's own dependency there) on 3.10."""

import sys

if sys.version_info >= (3, 11):
    from asyncio import timeout
else:  # pragma: no cover - exercised on Python 3.10 images only
    from async_timeout import timeout

__all__ = ["timeout"]
