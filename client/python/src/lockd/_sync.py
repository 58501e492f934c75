"""The blocking client: the ``lockd_lock`` context manager.

It mirrors the original design note's ``with lock_manager.lock(...) as acquired:``::

    with lockd_lock("127.0.0.1:50051", "schedule_123", ttl=300) as acquired:
        if acquired:
            run_job(fencing_token=acquired.fencing_token)
        else:
            print(f"skipping: already running on {acquired.holder.owner}")

While the lock is held, a background thread renews the lease at about a third of the TTL (an
``Extend`` that sets the remaining time back to the TTL), so a job may run longer than the TTL and
a crashed process still frees the lock within one TTL. If renewal fails (another holder has the
lock, or lockd cannot be reached until the lease may have expired), ``acquired.lost`` is set:
check it before doing anything the lock protects, and hand ``fencing_token`` to the systems the
job writes to so they can reject a stale holder. On exit, also when the body raises, renewal stops
and the lock is released (kept until ``min_hold`` has passed, if given: see ``lockd_lock``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from typing import Any, Callable, Iterator, Mapping, Optional, TypeVar, Union

import grpc

from ._common import RETRYABLE, Metadata, Tls, credentials, duration, first_renewal, metadata
from ._common import backoff as _delay
from .v1 import lock_pb2, lock_pb2_grpc

__all__ = ["Lock", "lockd_lock"]

T = TypeVar("T")

log = logging.getLogger("lockd")

class Lock:
    """What ``lockd_lock`` yields: truthy when the lock was acquired.

    Attributes:
        resource: the lock's name.
        acquired: True when this process holds the lock.
        lease: the ``lock_pb2.Lease`` granted by Acquire, or None.
        holder: when not acquired, the current holder's ``lock_pb2.LockInfo`` (``owner``,
            ``fencing_token``, ``expires_at``, ...); None if acquired, or if the lock was free
            when a wait ended.
        lost: a ``threading.Event`` set when the lock can no longer be trusted (renewal was
            refused, or failed until the lease may have expired). Never set when not acquired.
    """

    def __init__(self, resource: str, response: Any) -> None:
        """Wraps an ``AcquireResponse`` for ``resource``."""
        self.resource = resource
        self.acquired: bool = response.acquired
        self.lease = response.lease if response.acquired else None
        self.holder = response.holder if response.HasField("holder") else None
        self.lost = threading.Event()

    def __bool__(self) -> bool:
        """True when the lock was acquired."""
        return self.acquired

    @property
    def fencing_token(self) -> Optional[int]:
        """The lease's fencing token (greater than any earlier lease's), or None if not acquired."""
        return self.lease.fencing_token if self.lease is not None else None

    def __repr__(self) -> str:
        """A summary without the secret token."""
        if self.acquired:
            return (
                f"Lock({self.resource!r}, acquired, fencing_token={self.fencing_token}, "
                f"lost={self.lost.is_set()})"
            )
        owner = self.holder.owner if self.holder is not None else None
        return f"Lock({self.resource!r}, not acquired, holder={owner!r})"


class _Renewer(threading.Thread):
    """Extends the lease every ``ttl / 3`` until stopped; sets ``lock.lost`` when it cannot."""

    def __init__(self, stub: lock_pb2_grpc.LockServiceStub, lock: Lock, token: str, ttl: float,
                 valid_until: float, rpc_timeout: float, backoff: float,
                 call_metadata: Metadata) -> None:
        """``valid_until`` is a ``time.monotonic()`` before which the lease surely still holds."""
        super().__init__(name=f"lockd-renew-{lock.resource}", daemon=True)
        self.stub, self.lock, self.token, self.ttl = stub, lock, token, ttl
        self.metadata = call_metadata
        self.valid_until, self.rpc_timeout, self.backoff = valid_until, rpc_timeout, backoff
        self.stop = threading.Event()

    def run(self) -> None:
        """The renewal loop. Each attempt is bounded by the time the lease surely has left."""
        delay, failures = first_renewal(self.valid_until, self.ttl), 0
        while not self.stop.wait(delay):
            sent = time.monotonic()
            left = self.valid_until - sent
            if left <= 0:
                log.warning("lock %s lost: could not renew it in time", self.lock.resource)
                self.lock.lost.set()
                return
            request = lock_pb2.ExtendRequest(
                resource=self.lock.resource, token=self.token,
                ttl=duration(self.ttl), replace_ttl=True,
            )
            try:
                response = self.stub.Extend(request, timeout=min(self.rpc_timeout, left),
                                            metadata=self.metadata)
            except grpc.RpcError as e:
                # Keep trying until the lease may have expired: lockd or Redis may be back soon.
                log.warning("renewing lock %s failed: %s", self.lock.resource, e.code())
                left = max(self.valid_until - time.monotonic(), 0.0)
                delay = min(_delay(failures, self.backoff), left)
                failures += 1
                continue
            if not response.extended:
                log.warning("lock %s lost: renewal answered %s", self.lock.resource,
                            lock_pb2.LeaseStatus.Name(response.status))
                self.lock.lost.set()
                return
            # The new expiry is ttl after lockd ran the Extend, which was after `sent`.
            self.valid_until = sent + self.ttl
            delay, failures = self.ttl / 3, 0


def _stub(target: Any, tls: Tls) -> Any:
    """Returns ``(stub, channel_to_close)`` for a stub, a ``grpc.Channel`` or a "host:port"."""
    if isinstance(target, str):
        creds = credentials(tls)
        channel = (grpc.secure_channel(target, creds) if creds is not None
                   else grpc.insecure_channel(target))
        return lock_pb2_grpc.LockServiceStub(channel), channel
    if isinstance(target, grpc.Channel):
        return lock_pb2_grpc.LockServiceStub(target), None
    return target, None


def _call_with_retries(call: Callable[[Any], T], request_for: Callable[[int], Any], retries: int,
                       backoff: float, what: str) -> T:
    """Runs ``call(request_for(attempt))`` and retries on ``RETRYABLE`` codes, with backoff."""
    for attempt in range(retries + 1):
        try:
            return call(request_for(attempt))
        except grpc.RpcError as e:
            if e.code() not in RETRYABLE or attempt == retries:
                raise
            log.info("%s failed with %s; retrying", what, e.code())
            time.sleep(_delay(attempt, backoff))
    raise AssertionError("unreachable")


@contextlib.contextmanager
def lockd_lock(
    target: Union[str, grpc.Channel, "lock_pb2_grpc.LockServiceStub"],
    resource: str,
    ttl: float = 30.0,
    owner: str = "",
    wait: Optional[float] = None,
    labels: Optional[Mapping[str, str]] = None,
    *,
    min_hold: Optional[float] = None,
    retries: int = 4,
    backoff: float = 0.1,
    rpc_timeout: float = 5.0,
    api_key: Optional[str] = None,
    tls: Tls = None,
) -> Iterator[Lock]:
    """Takes the lock on ``resource`` for the ``with`` body; yields a ``Lock`` (truthy if acquired).

    Args:
        target: a ``LockServiceStub``, a ``grpc.Channel``, or a "host:port" string (a channel
            is then opened, with TLS per ``tls``, and closed on exit).
        resource: the lock's name, such as "schedule_123".
        ttl: the lease's time to live in seconds. Renewal keeps it alive while the body runs; it
            bounds how long a crashed process keeps the lock.
        owner: free text naming this holder, shown to the callers that do not get the lock.
        wait: seconds to wait for a held lock (None: try once, like ``blocking=False``).
        labels: stored with the lease and shown by GetOwner.
        min_hold: keep the lock at least this many seconds after it was granted, even when the
            body ends sooner (ShedLock's ``lockAtLeastFor``): the exit's Release carries
            ``min_hold``, and lockd keeps the lock, refused to everyone, until ``acquired_at +
            min_hold`` by its own clock. This is what keeps a fast job from running twice for one
            tick when schedulers' timers are skewed.
        retries: how many times a call failing with UNAVAILABLE or DEADLINE_EXCEEDED is retried,
            with jittered exponential backoff from ``backoff`` seconds. Acquire retries reuse the
            same client-chosen token, so a retry whose first reply was lost gets that lease back.
        rpc_timeout: time limit of each call, added to ``wait`` for Acquire.
        api_key: sent as ``authorization: Bearer <key>`` with every call, for lockd servers
            that check API keys.
        tls: for a "host:port" target: True for TLS checked against the system's roots, or
            ``grpc.ChannelCredentials`` (see ``lockd.tls_credentials``); None for plaintext.

    The body runs even when the lock was not acquired: test the yielded value. Exceptions from the
    body propagate; the lock is released all the same. A failed release is logged, not raised
    (the lease expires by itself within ``ttl``).
    """
    stub, channel = _stub(target, tls)
    call_metadata = metadata(api_key)
    token = f"py-{uuid.uuid4()}"  # a secret: never logged, never shown by lockd
    deadline = time.monotonic() + wait if wait else None
    sent = 0.0

    def acquire_request(_attempt: int):
        """The AcquireRequest for one attempt: same token, the wait time that is left."""
        nonlocal sent
        request = lock_pb2.AcquireRequest(
            resource=resource, ttl=duration(ttl), owner=owner, token=token, labels=labels or {},
        )
        if deadline is not None:
            left = deadline - time.monotonic()
            if left > 0.001:
                request.wait_timeout.CopyFrom(duration(left))
        sent = time.monotonic()
        return request

    def acquire(request):
        """One Acquire call, allowed its wait time plus ``rpc_timeout``."""
        timeout = rpc_timeout + (request.wait_timeout.ToNanoseconds() / 1e9)
        return stub.Acquire(request, timeout=timeout, metadata=call_metadata)

    renewer = None
    hold = duration(min_hold) if min_hold else None
    try:
        try:
            response = _call_with_retries(acquire, acquire_request, retries, backoff, "Acquire")
        except grpc.RpcError:
            # A lost reply may have granted the lease: free it if lockd answers, else it expires.
            _release_quietly(stub, resource, token, 0, backoff, rpc_timeout, call_metadata)
            raise
        lock = Lock(resource, response)
        if lock.acquired:
            renewer = _Renewer(stub, lock, token, ttl, sent + ttl, rpc_timeout, backoff,
                               call_metadata)
            renewer.start()
        try:
            yield lock
        finally:
            if renewer is not None:
                renewer.stop.set()
                renewer.join()
                # When lost, the lease is most likely gone already: one try, for a quick exit.
                tries = 0 if lock.lost.is_set() else retries
                _release_quietly(stub, resource, token, tries, backoff, rpc_timeout,
                                 call_metadata, hold)
    finally:
        if channel is not None:
            channel.close()


def _release_quietly(stub: Any, resource: str, token: str, retries: int, backoff: float,
                     rpc_timeout: float, call_metadata: Metadata, min_hold: Any = None) -> None:
    """Releases the lease (keeping it until ``acquired_at + min_hold`` when given, a
    ``Duration``); logs instead of raising, since the lease expires by itself anyway."""
    request = lock_pb2.ReleaseRequest(resource=resource, token=token, min_hold=min_hold)
    try:
        _call_with_retries(
            lambda r: stub.Release(r, timeout=rpc_timeout, metadata=call_metadata),
            lambda _a: request, retries, backoff,
            "Release",
        )
    except grpc.RpcError as e:
        log.warning("could not release lock %s (it expires by itself): %s", resource, e.code())
