"""HTTP for the sync and async paths, and the one place HTTP failures become ``dspy.lm15`` errors.

The pieces, one job each:

- ``common``: what both stacks share: the ``Transport`` protocols (``BlockingTransport`` for
  the sync side, ``AwaitableTransport`` for the async one), headers (the one place the key is
  revealed), replies, status and body checks, the translation of failures into lm15 errors, the
  stale-connection resend rule, key scrubbing.
- ``sync``: ``requests``' adapter (``SyncTransport``); ``urllib3_stack``: urllib3's
  connections below it, subclassed through documented API only to learn whether a request went
  out on a reused connection and which sockets a forked child inherited.
- ``asynchronous``: aiohttp, one session per event loop (``AsyncTransport``); aiohttp itself
  is imported by ``aiohttp_stack`` on the first async request.
- ``loops``: one resource per running event loop, released when the loop ends.
- ``env``: proxies and CA bundle, read once per transport.
- ``fork``: fresh connections in a forked child.
"""

from __future__ import annotations

from .asynchronous import AsyncTransport
from .common import (
    AwaitableTransport,
    BlockingTransport,
    JsonReply,
    StreamReply,
    Transport,
    build_headers,
    parse_json_body,
)
from .sync import SyncTransport

__all__ = [
    "AsyncTransport",
    "AwaitableTransport",
    "BlockingTransport",
    "JsonReply",
    "StreamReply",
    "SyncTransport",
    "Transport",
    "build_headers",
    "parse_json_body",
]
