"""What the blocking and the asyncio clients share: channels, credentials, retries, durations."""

from __future__ import annotations

import random
import time
from typing import Optional, Sequence, Tuple, Union

import grpc
from google.protobuf import duration_pb2

#: gRPC codes that mean "the request may not have arrived or its reply was lost": retried.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

#: Call metadata: (key, value) pairs.
Metadata = Sequence[Tuple[str, str]]

#: TLS for a "host:port" target: True for the system's roots, or credentials you built.
Tls = Union[bool, grpc.ChannelCredentials, None]


def duration(seconds: float) -> duration_pb2.Duration:
    """Converts seconds to a ``google.protobuf.Duration``."""
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(round(seconds * 1e9)))
    return d


def backoff(attempt: int, base: float) -> float:
    """The jittered exponential delay before retry number ``attempt`` (0-based)."""
    return float(base * (2**attempt) * (0.5 + random.random() / 2))


def metadata(api_key: Optional[str]) -> Metadata:
    """The metadata sent with every call: ``authorization: Bearer <key>`` when a key is given
    (for lockd servers that check API keys)."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def credentials(tls: Tls) -> Optional[grpc.ChannelCredentials]:
    """Channel credentials for ``tls``: None for plaintext."""
    if tls is True:
        return grpc.ssl_channel_credentials()
    if isinstance(tls, grpc.ChannelCredentials):
        return tls
    return None


def tls_credentials(
    root_certificates: Optional[bytes] = None,
    private_key: Optional[bytes] = None,
    certificate_chain: Optional[bytes] = None,
) -> grpc.ChannelCredentials:
    """TLS credentials from PEM bytes: the CA that signed lockd's certificate (None: the
    system's roots) and, for servers that require one, a client key and certificate."""
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


def first_renewal(valid_until: float, ttl: float) -> float:
    """Seconds until the first renewal: when a third of the TTL is used, counted from the send
    of the Acquire. After a long wait that is now: the lease was granted late in the wait, but
    only its send time is known, so the lease may have less left than a fresh one."""
    return max(0.0, valid_until - time.monotonic() - 2 * ttl / 3)
