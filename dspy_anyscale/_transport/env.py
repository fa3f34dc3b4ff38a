"""The parts of the environment HTTP honours, read once per transport and the same for both stacks.

Proxies come from ``HTTP(S)_PROXY`` / ``ALL_PROXY`` with ``NO_PROXY`` applied to the base URL
(requests' own reading of them); the CA bundle from ``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE`` or
``SSL_CERT_FILE``, else certifi's (what requests verifies against). Reading them on every request
costs a thread hop per request in aiohttp (``trust_env=True`` looks up ``.netrc`` and the proxy
variables in the default executor each time), so both stacks read them here, at construction.
"""

from __future__ import annotations

import functools
import os
import ssl
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit, urlunsplit

import requests

_CA_BUNDLE_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE")


@dataclass(frozen=True)
class Proxy:
    """A proxy for one base URL: its address without credentials, and the credentials apart."""

    url: str
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class HttpEnvironment:
    proxies: dict[str, str]  # requests' form: {"https": "http://proxy:3128", ...}
    verify: bool | str  # True, or the path of a CA bundle file or directory

    @property
    def ca_path(self) -> str | None:
        return self.verify if isinstance(self.verify, str) else None

    def proxy_for(self, base_url: str) -> Proxy | None:
        """The proxy requests would use for ``base_url``, split for aiohttp (which takes no credentials in URLs)."""
        scheme = urlsplit(base_url).scheme
        address = self.proxies.get(scheme) or self.proxies.get("all")
        if not address:
            return None
        if "://" not in address:
            address = f"http://{address}"
        parts = urlsplit(address)
        netloc = parts.hostname or ""
        if parts.port:
            netloc = f"{netloc}:{parts.port}"
        plain = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
        user = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        return Proxy(plain, user, password)


def read_environment(base_url: str) -> HttpEnvironment:
    proxies = requests.utils.get_environ_proxies(base_url)
    verify: bool | str = next((os.environ[name] for name in _CA_BUNDLE_VARIABLES if os.environ.get(name)), True)
    return HttpEnvironment(proxies=proxies, verify=verify)


@functools.lru_cache(maxsize=8)
def ssl_context(ca_path: str | None) -> ssl.SSLContext:
    """A verifying TLS context on the same CA bundle requests uses; built once per bundle and shared.

    Loading a bundle takes tens of milliseconds, so it is never done per session or per event loop.
    """
    if ca_path is None:
        import certifi

        ca_path = certifi.where()
    if os.path.isdir(ca_path):
        return ssl.create_default_context(capath=ca_path)
    return ssl.create_default_context(cafile=ca_path)
