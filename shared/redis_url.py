"""Redis URLs: plain ``redis://`` / ``rediss://`` / ``unix://`` as redis-py reads
them, and Sentinel URLs, which redis-py does not read at all:

    redis+sentinel://[user:pass@]host1[:port],host2[:port],.../<master-name>[/db]
        [?sentinel_username=...&sentinel_password=...]

``rediss+sentinel://`` talks TLS to the Sentinels and to the master. The port
defaults to 26379. ``user:pass`` are the master's credentials; the Sentinels' own
come in the query. This is the grammar Prefect, redis-vl and docling-jobkit accept.

Parsed by hand: ``urllib.parse`` refuses a comma-separated host list as a port
(``.port`` raises), and no maintained package parses this grammar.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}  # scheme → TLS
SENTINEL_PORT = 26379
_QUERY = ("sentinel_username", "sentinel_password")


@dataclass(frozen=True)
class SentinelTarget:
    """Where a Sentinel-managed master is found, and how to log in to it."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    ssl: bool = False


def is_sentinel(url: str) -> bool:
    return url.split("://", 1)[0].lower() in SENTINEL_SCHEMES


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Raises ValueError, saying what is wrong, for a malformed Sentinel URL."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SENTINEL_SCHEMES:
        raise ValueError("a Sentinel URL starts with redis+sentinel:// or rediss+sentinel://")
    parts = urlsplit(f"//{rest}")  # the netloc, path and query, without the scheme's rules
    netloc = parts.netloc
    username = password = None
    if "@" in netloc:
        credentials, netloc = netloc.rsplit("@", 1)
        user, has_password, secret = credentials.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    sentinels = tuple(_host_port(entry) for entry in netloc.split(","))
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ValueError("no master name: redis+sentinel://host:26379/<master-name>[/db]")
    if len(path) > 2:
        raise ValueError(f"expected /<master-name>[/db], got {parts.path!r}")
    db = 0
    if len(path) == 2:
        if not path[1].isdigit():
            raise ValueError(f"the database must be a number, got {path[1]!r}")
        db = int(path[1])
    query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    unknown = sorted(set(query) - set(_QUERY))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r}; a Sentinel URL takes {' and '.join(_QUERY)}")
    return SentinelTarget(
        sentinels=sentinels,
        master=unquote(path[0]),
        db=db,
        username=username,
        password=password,
        sentinel_username=query.get("sentinel_username", [None])[-1],
        sentinel_password=query.get("sentinel_password", [None])[-1],
        ssl=SENTINEL_SCHEMES[scheme.lower()],
    )


def _host_port(entry: str) -> tuple[str, int]:
    if not entry:
        raise ValueError("an empty host in the Sentinel list")
    if entry.startswith("["):  # [IPv6]:port
        host, _, tail = entry[1:].partition("]")
        port_text = tail.removeprefix(":") if tail else ""
        if tail and not tail.startswith(":"):
            raise ValueError(f"bad Sentinel address {entry!r}")
    else:
        host, _, port_text = entry.partition(":")
    if not host:
        raise ValueError(f"bad Sentinel address {entry!r}")
    if not port_text:
        return host, SENTINEL_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port in Sentinel address {entry!r}")
    return host, int(port_text)
