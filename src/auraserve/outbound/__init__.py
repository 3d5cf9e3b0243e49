"""The outbound HTTP guard: every request this process sends to a client-chosen URL (webhook
deliveries, image-to-image fetches) goes through here.

`policy` says where requests may go (`OutboundPolicy`: the address rules and the URL rules),
`transport` sends them pinned to the checked addresses (`OutboundCall`), `limits` bounds them
(`OutboundLimits`). The process builds one `OutboundPolicy` from its settings
(`Settings.outbound`); each use brings its own limits.
"""

from auraserve.outbound.limits import DEFAULT_CONNECT_TIMEOUT, OutboundLimits
from auraserve.outbound.policy import (
    MAX_URL_LENGTH,
    AddressPolicy,
    BlockedAddress,
    IPAddress,
    OutboundPolicy,
    parse_allow_list,
    validate_url,
)

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "MAX_URL_LENGTH",
    "AddressPolicy",
    "BlockedAddress",
    "IPAddress",
    "OutboundLimits",
    "OutboundPolicy",
    "parse_allow_list",
    "validate_url",
]
