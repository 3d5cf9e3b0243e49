"""Where this process may send HTTP requests: the address policy and the URL rules (SSRF guard).

Webhook URLs and image-to-image `image` URLs are chosen by clients, and the server fetches or
POSTs to them from inside our network. Without care that is a way to reach cloud metadata
services (credentials!), admin ports on loopback, or anything on the private network. Defence
happens in two places, the same for every outbound request:

1. `validate_url` — when the URL is submitted, a cheap *syntax* check so that obviously bad URLs
   are refused with a 400 before a job is queued. It performs no DNS lookup: a name that is fine
   now may be repointed later (and vice versa), so resolution-time checks cannot be done here.
2. `AddressPolicy.resolve_and_check` — when the request is made, resolve the host and refuse
   unless *every* address is globally routable unicast. The transport then connects to exactly
   the addresses that were checked (`outbound.transport`), which closes the DNS-rebinding gap
   between "check" and "connect".

Addresses are judged by explicit tables rather than only by `ipaddress`'s ``is_global``/
``is_private`` flags, because those tables changed between Python patch releases and do not treat
multicast as non-global; the flags are only used as a final catch-all. IPv6 forms that embed an IPv4
address (mapped, compatible, SIIT, NAT64, 6to4, Teredo) are judged by the embedded address, because
that is where the packets end up.

Development and tests need to reach ``localhost`` or a private network, so `AddressPolicy` takes
an allow list of host names and networks. It is an escape hatch for operators, never fed from
client input. `OutboundPolicy` bundles it with the plain-http switch; the process builds one from
its settings (`Settings.outbound`) and hands it to both the webhook deliveries and the image
fetches, so one operator decision governs every outbound request.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeAlias
from urllib.parse import urlsplit

from auraserve.errors import BlockedAddress, InvalidParameter, IPAddress

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_URL_LENGTH = 2048

__all__ = [
    "MAX_URL_LENGTH",
    "AddressPolicy",
    "BlockedAddress",
    "IPAddress",
    "OutboundPolicy",
    "parse_allow_list",
    "validate_url",
]


# ---------------------------------------------------------------------------------------------
# Address classification tables
# ---------------------------------------------------------------------------------------------

_METADATA: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, Oracle, DigitalOcean, ...
        "169.254.169.253",  # AWS VPC DNS resolver
        "169.254.170.2",  # AWS ECS task metadata / credentials
        "169.254.170.23",  # AWS EKS pod identity agent
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "fd00:ec2::23",  # AWS EKS pod identity agent over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud (classic)
    )
)

# Refused even when an allow-list entry covers them: they are never a unicast destination (and
# 0.0.0.0 / :: quietly mean "this host" on Linux).
_NEVER_V4: tuple[tuple[ipaddress.IPv4Network, str], ...] = tuple(
    (ipaddress.IPv4Network(n), r)
    for n, r in (
        ("0.0.0.0/32", "unspecified address"),
        ("255.255.255.255/32", "broadcast address"),
        ("224.0.0.0/4", "multicast"),
    )
)
_NEVER_V6: tuple[tuple[ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.IPv6Network(n), r)
    for n, r in (
        ("::/128", "unspecified address"),
        ("ff00::/8", "multicast"),
    )
)

_BLOCKED_V4: tuple[tuple[ipaddress.IPv4Network, str], ...] = tuple(
    (ipaddress.IPv4Network(n), r)
    for n, r in (
        ("0.0.0.0/8", "'this network' (0.0.0.0/8)"),
        ("10.0.0.0/8", "private network (RFC 1918)"),
        ("100.64.0.0/10", "carrier-grade NAT (100.64.0.0/10)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private network (RFC 1918)"),
        ("192.0.0.0/24", "IETF protocol assignments (192.0.0.0/24)"),
        ("192.0.2.0/24", "documentation range (TEST-NET-1)"),
        ("192.88.99.0/24", "deprecated 6to4 relay anycast"),
        ("192.168.0.0/16", "private network (RFC 1918)"),
        ("198.18.0.0/15", "benchmarking range (198.18.0.0/15)"),
        ("198.51.100.0/24", "documentation range (TEST-NET-2)"),
        ("203.0.113.0/24", "documentation range (TEST-NET-3)"),
        ("240.0.0.0/4", "reserved (240.0.0.0/4)"),
    )
)
_BLOCKED_V6: tuple[tuple[ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.IPv6Network(n), r)
    for n, r in (
        ("::1/128", "loopback"),
        ("64:ff9b:1::/48", "local-use NAT64 (64:ff9b:1::/48)"),
        ("100::/64", "discard-only (100::/64)"),
        ("2001:db8::/32", "documentation range (2001:db8::/32)"),
        ("3fff::/20", "documentation range (3fff::/20)"),
        ("fc00::/7", "unique local address (fc00::/7, private)"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local (deprecated)"),
    )
)

_GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")
_V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_V4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_V4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")
_NAT64_WKP = ipaddress.IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")
_TEREDO = ipaddress.IPv6Network("2001::/32")


def _embedded_v4(addr: ipaddress.IPv6Address) -> tuple[str, list[ipaddress.IPv4Address]] | None:
    """Return (kind, embedded IPv4 addresses) for IPv6 forms that carry an IPv4 destination.

    Connecting to any of these can end up at the embedded IPv4 address (the kernel does it for
    mapped addresses; NAT64/6to4/Teredo gateways do it on the path), so they must be judged by it.
    """
    low32 = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr in _V4_MAPPED:
        return "IPv4-mapped", [low32]
    if addr in _V4_TRANSLATED:
        return "IPv4-translated", [low32]
    if addr in _V4_COMPATIBLE and int(addr) > 1:  # :: and ::1 are themselves, not embeddings
        return "IPv4-compatible", [low32]
    if addr in _NAT64_WKP:
        return "NAT64", [low32]
    if addr in _SIX_TO_FOUR and addr.sixtofour is not None:
        return "6to4", [addr.sixtofour]
    if addr in _TEREDO and addr.teredo is not None:
        server, client = addr.teredo
        return "Teredo", [server, client]
    return None


def _parse_ip(text: str) -> IPAddress | None:
    """Parse an IP literal, tolerating URL brackets and IPv6 zone ids (``fe80::1%eth0``)."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    text = text.split("%", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _normalise_host(host: str) -> str:
    """Lower-case and drop brackets / a trailing root dot so allow-list matching is exact."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host.rstrip(".")


def parse_allow_list(allow: Iterable[str]) -> tuple[frozenset[str], tuple[IPNetwork, ...]]:
    """The host names and the networks of an operator allow list (blank entries skipped).

    Raises:
        ValueError: naming an entry that is neither a host name, an address nor a network.
    """
    hosts: set[str] = set()
    networks: list[IPNetwork] = []
    for raw in allow:
        entry = raw.strip()
        if not entry:
            continue
        ip = _parse_ip(entry)
        if ip is not None:
            networks.append(ipaddress.ip_network(ip))
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
            continue
        except ValueError:
            pass
        name = _normalise_host(entry)
        if not _HOSTNAME_RE.fullmatch(name):
            raise ValueError(f"allow-list entry {raw!r} is neither a host nor a network")
        hosts.add(name)
    return frozenset(hosts), tuple(networks)


class AddressPolicy:
    """Which destinations an outbound request (webhook, image fetch) may connect to.

    By default only globally routable unicast addresses pass. ``allow`` is the operator's escape
    hatch for development and tests, e.g. ``["127.0.0.1", "::1", "localhost", "10.0.0.0/8"]``:

    * a *host name* entry allows every address that name resolves to (the operator vouches for the
      name, e.g. ``localhost`` or an internal receiver);
    * an *address or network* entry allows addresses inside it, whatever name led there.

    Two things are never overridden: the unspecified / broadcast / multicast addresses (never a
    valid destination, and ``0.0.0.0`` silently means "this host"), and cloud metadata endpoints,
    which only pass if the allow list names that exact address — a broad ``169.254.0.0/16`` or an
    allowed host name must not quietly expose instance credentials.
    """

    def __init__(self, allow: Iterable[str] = ()) -> None:
        hosts, networks = parse_allow_list(allow)
        self.allowed_hosts: frozenset[str] = hosts
        self.allowed_networks: tuple[IPNetwork, ...] = networks

    def __repr__(self) -> str:
        entries = sorted(self.allowed_hosts) + [str(n) for n in self.allowed_networks]
        return f"AddressPolicy(allow={entries!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AddressPolicy):
            return NotImplemented
        return (self.allowed_hosts, set(self.allowed_networks)) == (
            other.allowed_hosts,
            set(other.allowed_networks),
        )

    def __hash__(self) -> int:
        return hash((self.allowed_hosts, frozenset(self.allowed_networks)))

    # -- queries --------------------------------------------------------------------------------

    def host_allowed(self, host: str) -> bool:
        """Whether ``host`` (a name, not an address) is on the allow list."""
        return _normalise_host(host) in self.allowed_hosts

    def _address_allowed(self, addr: IPAddress) -> bool:
        return any(addr.version == n.version and addr in n for n in self.allowed_networks)

    def _metadata_allowed(self, addr: IPAddress) -> bool:
        return any(
            addr.version == n.version and n.num_addresses == 1 and addr in n
            for n in self.allowed_networks
        )

    def blocked_reason(self, addr: IPAddress, *, host_allowed: bool = False) -> str | None:
        """Return why ``addr`` may not be contacted, or None when it may.

        ``host_allowed`` says the name that led to this address is allow-listed.
        """
        embedded = _embedded_v4(addr) if isinstance(addr, ipaddress.IPv6Address) else None
        # The overrides-proof checks look through embeddings too, so that an allow-listed name
        # resolving to ::ffff:169.254.169.254 cannot reach the metadata service.
        for candidate in [addr, *(embedded[1] if embedded else [])]:
            reason = None
            never = _NEVER_V4 if candidate.version == 4 else _NEVER_V6
            for net, never_reason in never:
                if candidate in net:
                    reason = never_reason
                    break
            if reason is None and candidate in _METADATA and not self._metadata_allowed(candidate):
                reason = "cloud metadata endpoint"
            if reason is not None:
                if candidate is addr or embedded is None:
                    return reason
                return f"{embedded[0]} address embedding {candidate} ({reason})"
        if host_allowed or self._address_allowed(addr):
            return None

        if isinstance(addr, ipaddress.IPv6Address):
            if embedded is not None:
                kind, v4s = embedded
                for v4 in v4s:
                    inner = self.blocked_reason(v4)
                    if inner is not None:
                        return f"{kind} address embedding {v4} ({inner})"
                if kind in ("IPv4-mapped", "IPv4-translated", "IPv4-compatible", "NAT64"):
                    return None  # the destination *is* the (acceptable) IPv4 address
            for net6, reason in _BLOCKED_V6:
                if addr in net6:
                    return reason
            if addr not in _GLOBAL_UNICAST_V6:
                return "not global unicast (outside 2000::/3)"
        else:
            for net4, reason in _BLOCKED_V4:
                if addr in net4:
                    return reason
        if not addr.is_global:
            return "not globally routable"
        return None

    def check_address(self, addr: IPAddress, *, host: str | None = None) -> None:
        """Raise `BlockedAddress` unless ``addr`` may be contacted (for a URL naming ``host``)."""
        allowed_name = host is not None and _parse_ip(host) is None and self.host_allowed(host)
        reason = self.blocked_reason(addr, host_allowed=allowed_name)
        if reason is not None:
            raise BlockedAddress(host if host is not None else str(addr), addr, reason)

    def resolve_and_check(self, host: str, port: int) -> list[IPAddress]:
        """Resolve ``host`` and return its addresses, refusing unless *all* of them pass.

        All, not any: otherwise a name with one public and one private record would let the
        connection land on the private one. The result is de-duplicated, in resolver order, and is
        what the caller must connect to — resolving again later would reopen DNS rebinding.

        Raises:
            BlockedAddress: some address is refused, or the name resolved to nothing.
            OSError (socket.gaierror): resolution failed; transient, so the caller should retry.
        """
        lookup = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        # Looked up on the module at call time so tests can stand in for DNS.
        infos = socket.getaddrinfo(lookup, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        addresses: list[IPAddress] = []
        for family, _type, _proto, _canon, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            addr = _parse_ip(str(sockaddr[0]))
            if addr is not None and addr not in addresses:
                addresses.append(addr)
        if not addresses:
            raise BlockedAddress(host, None, "the name resolved to no IP address")
        for addr in addresses:
            self.check_address(addr, host=host)
        return addresses


# ---------------------------------------------------------------------------------------------
# Submit-time syntax check
# ---------------------------------------------------------------------------------------------

_LABEL = r"(?!-)[a-z0-9_-]{1,63}(?<!-)"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_NUMERIC_LABEL_RE = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)")


def validate_url(
    url: str,
    *,
    allow_http: bool = False,
    policy: AddressPolicy | None = None,
    field: str = "url",
    noun: str = "The URL",
) -> str:
    """Check a client-supplied URL's syntax and return its normalised form.

    ``field`` is what errors name (the header or body field the URL came from) and ``noun`` how
    their messages start (``"The webhook URL"`` gives "The webhook URL must use https://..."),
    so each caller's clients read about their own field.

    This runs when the job is submitted so the client gets a 400 now rather than an
    undeliverable callback or unfetchable image later. Rules: ``https`` only (plain ``http`` only
    with ``allow_http``, for development); a host is required; no ``user:password@`` (credentials
    would be logged and stored, and ``@`` is a classic trick to disguise the real host); port
    1–65535; at most 2048 characters; no whitespace, control characters or backslashes (parsers
    disagree about them, and disagreement between checker and connector is how SSRF filters get
    bypassed).

    Hosts that look numeric but are not a canonical dotted quad (``2130706433``, ``0x7f.1``,
    ``127.1``) are refused: resolvers turn them into IPs, no real DNS name looks like that, and
    they exist only to slip past filters.

    No DNS lookup is done here. If ``policy`` is given, IP-literal hosts and ``localhost`` names
    are additionally checked against it, since their address cannot change later.

    The returned URL is the ``httpx``-normalised form (lower-case scheme and host, IDNA host,
    default port dropped); it is the one to store, so that what we checked is what we connect to.

    Raises:
        InvalidParameter: naming ``field``, with a message saying what is wrong.
    """

    def _invalid(message: str) -> InvalidParameter:
        return InvalidParameter(field=field, message=message.replace("The URL", noun, 1))

    if not isinstance(url, str) or not url:
        raise _invalid("The URL is empty.")
    if len(url) > MAX_URL_LENGTH:
        raise _invalid(f"The URL is longer than {MAX_URL_LENGTH} characters.")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F or ch.isspace() for ch in url):
        raise _invalid("The URL must not contain whitespace or control characters.")
    if "\\" in url:
        raise _invalid("The URL must not contain backslashes.")

    # httpx parses URLs exactly as the transport will; imported here so that settings
    # validation (every CLI command) does not pay for the HTTP stack.
    import httpx

    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise _invalid(f"The URL is not a valid URL ({exc}).") from exc

    scheme = parsed.scheme
    if scheme == "http":
        if not allow_http:
            raise _invalid("The URL must use https://; plain http:// is not accepted.")
    elif scheme != "https":
        raise _invalid("The URL must be an absolute https:// URL.")
    # Also ask the stdlib parser: an '@' anywhere in the authority (even an empty userinfo) means
    # two parsers could disagree about which part is the host.
    try:
        netloc = urlsplit(url).netloc
    except ValueError as exc:
        raise _invalid(f"The URL is not a valid URL ({exc}).") from exc
    if parsed.userinfo or "@" in netloc:
        raise _invalid("The URL must not contain a user name or password.")

    raw_host = parsed.raw_host.decode("ascii", "replace")
    if not raw_host:
        raise _invalid("The URL has no host.")
    port = parsed.port
    if port is not None and not 1 <= port <= 65535:
        raise _invalid("The URL's port must be between 1 and 65535.")

    ip = None
    if ":" in raw_host:  # bracketed IPv6 literal
        if "%" in raw_host:
            raise _invalid("The URL must not use an IPv6 zone id.")
        ip = _parse_ip(raw_host)
        if ip is None:
            raise _invalid("The URL's host is not a valid IPv6 address.")
    else:
        name = raw_host.lower().removesuffix(".")
        if len(name) > 253 or not _HOSTNAME_RE.fullmatch(name):
            raise _invalid("The URL's host is not a valid host name.")
        if _NUMERIC_LABEL_RE.fullmatch(name.rsplit(".", 1)[-1]):
            try:
                ip = ipaddress.IPv4Address(name)
            except ValueError:
                raise _invalid("The URL's host looks like a non-canonical IP address.") from None

    if policy is not None:
        try:
            if ip is not None:
                policy.check_address(ip, host=str(ip))
            else:
                name = _normalise_host(raw_host)
                if (name == "localhost" or name.endswith(".localhost")) and not (
                    policy.host_allowed(name)
                ):
                    raise BlockedAddress(name, None, "loopback (localhost)")
        except BlockedAddress as exc:
            raise _invalid(f"The URL points to a disallowed address: {exc.reason}.") from exc

    if parsed.port is not None and parsed.port == {"https": 443, "http": 80}[scheme]:
        parsed = parsed.copy_with(port=None)
    return str(parsed)


# ---------------------------------------------------------------------------------------------
# The policy of one process
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutboundPolicy:
    """Where this process may send HTTP requests: webhooks and image fetches alike.

    Built once per process from the settings (`Settings.outbound`) and handed to the webhook
    deliveries and the worker's image fetches, so the operator's allow list and the plain-http
    switch mean the same for both.

    Attributes:
        addresses: which addresses may be contacted (`AddressPolicy`).
        allow_http: accept plain ``http://`` URLs too (development only).
    """

    addresses: AddressPolicy = field(default_factory=AddressPolicy)
    allow_http: bool = False

    @classmethod
    def from_allow_list(
        cls, allow: Iterable[str] = (), *, allow_http: bool = False
    ) -> OutboundPolicy:
        return cls(addresses=AddressPolicy(allow), allow_http=allow_http)

    def check_url(
        self, url: str, *, field: str, noun: str = "The URL", literal_addresses: bool = True
    ) -> str:
        """`validate_url` under this policy: the normalised URL, or `InvalidParameter`.

        ``literal_addresses`` also refuses hosts that are a disallowed IP literal or a
        ``localhost`` name (their address cannot change later); a caller that resolves and
        checks right away anyway may skip it to report those like any blocked address.
        """
        return validate_url(
            url,
            allow_http=self.allow_http,
            policy=self.addresses if literal_addresses else None,
            field=field,
            noun=noun,
        )
