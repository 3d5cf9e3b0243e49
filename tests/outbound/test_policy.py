"""The outbound guard's rules as tables: what is refused (and why), what passes, URL syntax,
and the policy object the process builds once."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from auraserve.errors import InvalidParameter
from auraserve.outbound import (
    AddressPolicy,
    BlockedAddress,
    OutboundPolicy,
    parse_allow_list,
    validate_url,
)
from tests.outbound.conftest import FakeDNS

DEV_ALLOW = ["127.0.0.1", "::1", "localhost", "10.0.0.0/8"]

BLOCKED = [
    # IPv4
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("10.0.0.1", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("169.254.1.1", "link-local"),
    ("169.254.169.254", "metadata"),
    ("169.254.170.2", "metadata"),
    ("100.100.100.200", "metadata"),
    ("100.64.0.1", "carrier-grade NAT"),
    ("100.127.255.254", "carrier-grade NAT"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "this network"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("255.255.255.255", "broadcast"),
    ("240.0.0.1", "reserved"),
    ("192.0.2.10", "documentation"),
    ("198.51.100.7", "documentation"),
    ("203.0.113.9", "documentation"),
    ("198.18.0.1", "benchmarking"),
    ("192.0.0.8", "IETF"),
    ("192.88.99.1", "6to4 relay"),
    # IPv6
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("fe80::1", "link-local"),
    ("febf::1", "link-local"),
    ("fc00::1", "unique local"),
    ("fd12:3456:789a::1", "unique local"),
    ("fd00:ec2::254", "metadata"),
    ("fec0::1", "site-local"),
    ("ff02::1", "multicast"),
    ("ff0e::1", "multicast"),
    ("2001:db8::1", "documentation"),
    ("100::1", "discard"),
    ("4000::1", "global unicast"),
    # IPv6 forms embedding an IPv4 destination: judged by the embedded address
    ("::ffff:127.0.0.1", "IPv4-mapped address embedding 127.0.0.1 (loopback)"),
    ("::ffff:7f00:1", "loopback"),
    ("::ffff:10.1.2.3", "private"),
    ("::ffff:169.254.169.254", "metadata"),
    ("::ffff:0.0.0.0", "unspecified"),
    ("::127.0.0.1", "IPv4-compatible"),
    ("::ffff:0:127.0.0.1", "IPv4-translated"),
    ("64:ff9b::10.0.0.1", "NAT64 address embedding 10.0.0.1"),
    ("64:ff9b::169.254.169.254", "metadata"),
    ("64:ff9b:1::1", "local-use NAT64"),
    ("2002:7f00:1::1", "6to4 address embedding 127.0.0.1"),
    ("2002:c0a8:101::1", "6to4 address embedding 192.168.1.1"),
    ("2002:a9fe:a9fe::1", "metadata"),
    # Teredo: server 65.54.227.120, client (obfuscated) 192.168.1.1
    ("2001:0:4136:e378:8000:63bf:3f57:fefe", "Teredo address embedding 192.168.1.1"),
    ("2001::1", "Teredo"),  # embedded 0.0.0.0 server
]

ALLOWED = [
    "93.184.215.14",
    "1.1.1.1",
    "8.8.8.8",
    "100.63.255.255",  # just below CGNAT
    "100.128.0.0",  # just above CGNAT
    "172.15.255.255",
    "172.32.0.1",
    "169.253.255.255",
    "2606:4700::1111",
    "2001:4860:4860::8888",
    "2a00:1450:4001:80b::200e",
    "::ffff:93.184.215.14",  # mapped, public embedded
    "64:ff9b::8.8.8.8",  # NAT64 of a public address
    "2002:0808:0808::1",  # 6to4 of a public address
]


@pytest.mark.parametrize(("address", "reason"), BLOCKED)
def test_blocked_addresses(address: str, reason: str) -> None:
    policy = AddressPolicy()
    got = policy.blocked_reason(ipaddress.ip_address(address))
    assert got is not None, f"{address} should be refused"
    assert reason.lower() in got.lower()
    with pytest.raises(BlockedAddress) as info:
        policy.check_address(ipaddress.ip_address(address))
    assert info.value.reason == got


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_pass(address: str) -> None:
    assert AddressPolicy().blocked_reason(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("10.200.0.3", True),
        ("::ffff:10.200.0.3", True),  # judged by the embedded address, which is allow-listed
        ("127.0.0.2", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
    ],
)
def test_allow_list_by_address(address: str, allowed: bool) -> None:
    policy = AddressPolicy(DEV_ALLOW)
    assert (policy.blocked_reason(ipaddress.ip_address(address)) is None) is allowed


def test_allow_list_never_opens_metadata_or_multicast_by_range() -> None:
    policy = AddressPolicy(["169.254.0.0/16", "224.0.0.0/4", "0.0.0.0/8", "fd00::/8"])
    assert policy.blocked_reason(ipaddress.ip_address("169.254.1.1")) is None
    assert "metadata" in (policy.blocked_reason(ipaddress.ip_address("169.254.169.254")) or "")
    assert "metadata" in (policy.blocked_reason(ipaddress.ip_address("fd00:ec2::254")) or "")
    assert "multicast" in (policy.blocked_reason(ipaddress.ip_address("224.0.0.1")) or "")
    assert "unspecified" in (policy.blocked_reason(ipaddress.ip_address("0.0.0.0")) or "")
    # ...but naming the exact metadata address is an explicit, deliberate choice.
    exact = AddressPolicy(["169.254.169.254"])
    assert exact.blocked_reason(ipaddress.ip_address("169.254.169.254")) is None


def test_bad_allow_entry_rejected() -> None:
    with pytest.raises(ValueError, match="neither a host nor a network"):
        AddressPolicy(["https://example.com"])
    with pytest.raises(ValueError, match=r"'https://example\.com'"):
        parse_allow_list(["localhost", "https://example.com"])


def test_allow_list_parsing() -> None:
    hosts, networks = parse_allow_list([" Localhost. ", "", "10.0.0.0/8", "::1", "127.0.0.1"])
    assert hosts == frozenset({"localhost"})
    assert [str(n) for n in networks] == ["10.0.0.0/8", "::1/128", "127.0.0.1/32"]


def test_policies_compare_by_their_allow_list() -> None:
    assert AddressPolicy(["127.0.0.1", "localhost"]) == AddressPolicy(["LOCALHOST", "127.0.0.1"])
    assert AddressPolicy(["127.0.0.1"]) != AddressPolicy()
    assert len({AddressPolicy(["::1"]), AddressPolicy(["::1"])}) == 1


# -- resolution --------------------------------------------------------------------------------


def test_real_localhost_is_refused_by_default() -> None:
    """No stand-in DNS here: the system resolver's answer for localhost must be refused."""
    with pytest.raises(BlockedAddress, match="loopback"):
        AddressPolicy().resolve_and_check("localhost", 443)
    with pytest.raises(BlockedAddress, match="loopback"):
        AddressPolicy().resolve_and_check("127.0.0.1", 443)
    with pytest.raises(BlockedAddress, match="loopback"):
        AddressPolicy().resolve_and_check("[::1]", 443)


def test_real_localhost_allowed_by_name_and_by_address() -> None:
    addrs = AddressPolicy(["localhost"]).resolve_and_check("localhost", 443)
    assert addrs and all(a.is_loopback for a in addrs)
    assert AddressPolicy(["127.0.0.1"]).resolve_and_check("127.0.0.1", 443) == [
        ipaddress.ip_address("127.0.0.1")
    ]


def test_numeric_host_forms_are_judged_by_what_they_resolve_to() -> None:
    # glibc turns these into 127.0.0.1; the address check still catches them at delivery time.
    for host in ("2130706433", "0x7f000001", "127.1"):
        try:
            socket.getaddrinfo(host, 443)
        except socket.gaierror:  # pragma: no cover - resolver without legacy forms
            continue
        with pytest.raises(BlockedAddress, match="loopback"):
            AddressPolicy().resolve_and_check(host, 443)


def test_all_addresses_must_pass(fake_dns: FakeDNS) -> None:
    fake_dns.set("mixed.example.test", "93.184.215.14", "10.0.0.5")
    with pytest.raises(BlockedAddress) as info:
        AddressPolicy().resolve_and_check("mixed.example.test", 443)
    assert info.value.address == ipaddress.ip_address("10.0.0.5")
    assert "10.0.0.5" in str(info.value) and "private" in str(info.value)

    fake_dns.set("v6mixed.example.test", "2606:4700::1111", "::ffff:127.0.0.1")
    with pytest.raises(BlockedAddress, match="loopback"):
        AddressPolicy().resolve_and_check("v6mixed.example.test", 443)


def test_public_name_passes_and_is_deduplicated(fake_dns: FakeDNS) -> None:
    fake_dns.set("public.example.test", "93.184.215.14", "2606:4700::1111", "93.184.215.14")
    assert AddressPolicy().resolve_and_check("public.example.test", 443) == [
        ipaddress.ip_address("93.184.215.14"),
        ipaddress.ip_address("2606:4700::1111"),
    ]


def test_allow_by_host_name(fake_dns: FakeDNS) -> None:
    fake_dns.set("receiver.internal", "10.1.2.3", "192.168.7.7")
    policy = AddressPolicy(["Receiver.Internal."])
    assert len(policy.resolve_and_check("receiver.internal", 443)) == 2
    assert len(policy.resolve_and_check("RECEIVER.internal.", 443)) == 2
    # The name is trusted, the address ranges are not: another name to the same IP is refused.
    fake_dns.set("other.internal", "192.168.7.7")
    with pytest.raises(BlockedAddress):
        policy.resolve_and_check("other.internal", 443)


def test_allowed_name_still_cannot_reach_metadata(fake_dns: FakeDNS) -> None:
    fake_dns.set("sneaky.internal", "169.254.169.254")
    fake_dns.set("sneaky6.internal", "::ffff:169.254.169.254")
    policy = AddressPolicy(["sneaky.internal", "sneaky6.internal"])
    for name in ("sneaky.internal", "sneaky6.internal"):
        with pytest.raises(BlockedAddress, match="metadata"):
            policy.resolve_and_check(name, 443)


def test_resolution_failure_is_an_oserror(fake_dns: FakeDNS) -> None:
    fake_dns.set("nxdomain.example.test")
    with pytest.raises(socket.gaierror):
        AddressPolicy().resolve_and_check("nxdomain.example.test", 443)


# -- URL syntax --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://hooks.example.com/auraserve", "https://hooks.example.com/auraserve"),
        ("HTTPS://Hooks.Example.COM:443/a?b=c", "https://hooks.example.com/a?b=c"),
        ("https://hooks.example.com:8443/x", "https://hooks.example.com:8443/x"),
        ("https://bücher.example/hook", "https://xn--bcher-kva.example/hook"),
        ("https://93.184.215.14/hook", "https://93.184.215.14/hook"),
        ("https://[2606:4700::1111]/hook", "https://[2606:4700::1111]/hook"),
        ("https://my_service.example.com/", "https://my_service.example.com/"),
        ("https://example.com./", "https://example.com./"),
    ],
)
def test_valid_urls(url: str, expected: str) -> None:
    assert validate_url(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://hooks.example.com/", "https://"),
        ("ftp://hooks.example.com/", "https://"),
        ("hooks.example.com/path", "https://"),
        ("//hooks.example.com/path", "https://"),
        ("", "empty"),
        ("https:///path", "no host"),
        ("https://", "no host"),
        ("https:hooks.example.com", "no host"),
        ("https://user:pw@hooks.example.com/", "user name or password"),
        ("https://user@hooks.example.com/", "user name or password"),
        ("https://@hooks.example.com/", "user name or password"),
        ("https://good.com\\@evil.com/", "backslash"),
        ("https://hooks.example.com/\x00", "control"),
        ("https://hooks.example.com/a b", "whitespace"),
        (" https://hooks.example.com/", "whitespace"),
        ("https://hooks.example.com/\n", "whitespace"),
        ("https://hooks.example.com/\u3000", "whitespace"),
        ("https://hooks.example.com/" + "a" * 2100, "2048"),
        ("https://hooks.example.com:0/", "port"),
        ("https://hooks.example.com:65536/", "port"),
        ("https://hooks.example.com:99999/", "port"),
        ("https://hooks.example.com:abc/", "valid"),
        ("https://2130706433/", "non-canonical"),
        ("https://0x7f000001/", "non-canonical"),
        ("https://127.1/", "non-canonical"),
        ("https://0177.0.0.1/", "not a valid url"),
        ("https://-bad.example.com/", "host name"),
        ("https://bad..example.com/", "host name"),
        ("https://[fe80::1%25eth0]/", "zone"),
        ("https://[::1/", "valid"),
    ],
)
def test_invalid_urls(url: str, message: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        validate_url(url)
    assert info.value.field == "url"
    assert info.value.status == 400
    assert message.lower() in info.value.message.lower()


def test_http_allowed_only_when_asked() -> None:
    with pytest.raises(InvalidParameter, match="plain http"):
        validate_url("http://localhost:8000/hook")
    assert validate_url("http://localhost:8000/hook", allow_http=True) == (
        "http://localhost:8000/hook"
    )
    with pytest.raises(InvalidParameter):
        validate_url("ftp://localhost/", allow_http=True)


def test_length_limit_is_inclusive() -> None:
    base = "https://hooks.example.com/"
    url = base + "a" * (2048 - len(base))
    assert len(url) == 2048
    assert validate_url(url) == url


def test_policy_checks_literal_hosts_at_submit_time() -> None:
    policy = AddressPolicy()
    for url in (
        "https://127.0.0.1/hook",
        "https://[::1]/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://[::ffff:10.0.0.1]/",
        "https://localhost/hook",
        "https://app.localhost/hook",
    ):
        with pytest.raises(InvalidParameter, match="disallowed address"):
            validate_url(url, policy=policy)
    # Names are not resolved at submit time; literals that pass, pass.
    assert validate_url("https://hooks.example.com/", policy=policy)
    assert validate_url("https://93.184.215.14/", policy=policy)
    dev = AddressPolicy(DEV_ALLOW)
    assert validate_url("https://127.0.0.1:8443/hook", policy=dev)
    assert validate_url("https://localhost:8443/hook", policy=dev)


def test_errors_name_the_callers_field_and_noun() -> None:
    with pytest.raises(InvalidParameter) as info:
        validate_url("http://hooks.example.com/", field="X-Webhook-URL", noun="The webhook URL")
    assert info.value.field == "X-Webhook-URL"
    assert info.value.message.startswith("The webhook URL must use https://")
    with pytest.raises(InvalidParameter) as info:
        validate_url("https://127.1/", field="image", noun="the URL")
    assert info.value.field == "image"
    assert info.value.message == "the URL's host looks like a non-canonical IP address."


# -- the policy of one process -----------------------------------------------------------------


def test_outbound_policy_checks_urls_with_its_allow_list_and_http_switch() -> None:
    strict = OutboundPolicy()
    dev = OutboundPolicy.from_allow_list(DEV_ALLOW, allow_http=True)
    url = "http://127.0.0.1:8000/x"
    with pytest.raises(InvalidParameter, match="plain http"):
        strict.check_url(url, field="url")
    assert dev.check_url(url, field="url") == url
    with pytest.raises(InvalidParameter, match="disallowed address: loopback"):
        strict.check_url("https://127.0.0.1/x", field="url")
    # Skipping the literal check leaves it to resolve_and_check (a caller that resolves anyway).
    assert strict.check_url("https://127.0.0.1/x", field="url", literal_addresses=False)
    assert dev == OutboundPolicy.from_allow_list(list(reversed(DEV_ALLOW)), allow_http=True)
