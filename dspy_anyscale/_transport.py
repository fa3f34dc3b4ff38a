"""HTTP for the sync and async paths, and the one place HTTP failures become ``dspy.lm15`` errors.

The pieces, one job each:

- ``_transport_common``: what both stacks share: headers, replies, status and body checks, the
  translation of failures into lm15 errors, the stale-connection resend rule, key scrubbing.
- ``_transport_sync``: ``requests``' adapter (``SyncTransport``); ``_transport_urllib3``: the
  urllib3 connections below it (one send per request, a lean response-head parser).
- ``_transport_async``: aiohttp, one session per event loop (``AsyncTransport``); aiohttp itself
  is imported by ``_transport_aiohttp`` on the first async request.
- ``_transport_loops``: one resource per running event loop, released when the loop ends.
- ``_transport_env``: proxies and CA bundle, read once per transport.
- ``_transport_fork``: fresh connections in a forked child.
"""

from __future__ import annotations

from ._transport_async import AsyncTransport
from ._transport_common import JsonReply, Secret, StreamReply, build_headers, parse_json_body
from ._transport_sync import SyncTransport

__all__ = [
    "AsyncTransport",
    "JsonReply",
    "Secret",
    "StreamReply",
    "SyncTransport",
    "build_headers",
    "parse_json_body",
]
