"""Which addresses a webhook may call: a guard against server-side request forgery.

A webhook URL makes the hive send a POST wherever a client says, from inside the
cluster's network: to Redis, a cloud's metadata service (169.254.169.254), an
admin port on loopback. So the host is resolved and every address it resolves to
must be public (not loopback, private, link-local, shared, multicast, reserved or
unspecified): at submit, and again at every delivery, where the request is then
sent to the address that was checked (a name that resolves to a public address at
submit and to a private one later, DNS rebinding, gets nowhere). Operators whose
receivers sit on a private network say so with ``--webhook-allow-private``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit, urlunsplit

#: Resolving a webhook's host never takes longer than this (the resolver's own
#: timeout can be 5 s a server).
RESOLVE_TIMEOUT_S = 5.0


class WebhookRefused(Exception):
    """The webhook's host cannot be resolved, or resolves to an address the hive
    does not call. ``code``: WEBHOOK_UNRESOLVABLE or WEBHOOK_ADDRESS_REFUSED."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def refusal(address: str) -> str | None:
    """Why the hive will not call ``address`` (an IP literal), or None when it may."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback
    for kind in ("loopback", "link_local", "private", "multicast", "reserved", "unspecified"):
        if getattr(ip, f"is_{kind}"):
            return f"{ip} is a {kind.replace('_', '-')} address"
    if not ip.is_global:  # shared address space (100.64/10), documentation ranges, ...
        return f"{ip} is not a public address"
    return None


def _port(url: str) -> int:
    parts = urlsplit(url)
    return parts.port or (443 if parts.scheme == "https" else 80)


async def resolve(url: str, allow_private: bool = False) -> list[str]:
    """The addresses of ``url``'s host, every one of them allowed, or WebhookRefused."""
    host = urlsplit(url).hostname or ""
    try:
        infos = await asyncio.wait_for(
            asyncio.get_running_loop().getaddrinfo(host, _port(url), type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_S
        )
    except (OSError, UnicodeError, ValueError, asyncio.TimeoutError) as e:
        raise WebhookRefused("WEBHOOK_UNRESOLVABLE", f"the webhook's host {host!r} cannot be resolved: {e or 'timed out'}") from e
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise WebhookRefused("WEBHOOK_UNRESOLVABLE", f"the webhook's host {host!r} has no address")
    if not allow_private:
        for address in addresses:
            reason = refusal(address)
            if reason:
                raise WebhookRefused(
                    "WEBHOOK_ADDRESS_REFUSED", f"the webhook's host {host!r} resolves to a refused address ({reason}); the hive calls public addresses only"
                )
    return addresses


def pinned(url: str, address: str) -> tuple[str, dict[str, str], dict[str, str]]:
    """``url`` with its host replaced by ``address``, the one that was checked, and the
    ``Host`` header and TLS server name (httpx's ``sni_hostname`` extension: the
    certificate is still verified against the real name) that keep the request the same.
    Returns (url, headers, extensions)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    literal = f"[{address}]" if ":" in address else address
    netloc = f"{literal}:{parts.port}" if parts.port else literal
    host_header = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=netloc)), {"Host": host_header}, {"sni_hostname": host}
