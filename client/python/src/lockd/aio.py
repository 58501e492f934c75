"""The asyncio client: ``async with lockd.lock(...) as acquired:``, over ``grpc.aio``.

It behaves as ``lockd_lock`` does (renewal at a third of the TTL, ``lost`` when renewal fails,
release on exit, ``min_hold``, retries with one client-chosen token), with an asyncio task in
place of the renewal thread and an ``asyncio.Event`` as ``lost``::

    async with lockd.lock("127.0.0.1:50051", "nightly-scan", ttl=30) as acquired:
        if acquired:
            await run_job(acquired.fencing_token, acquired.lost)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, Optional, TypeVar, Union

import grpc
import grpc.aio

from ._common import RETRYABLE, Metadata, Tls, credentials, duration, first_renewal, metadata
from ._common import backoff as _delay
from ._sync import Lock
from .v1 import lock_pb2, lock_pb2_grpc

__all__ = ["AsyncLock", "lock"]

log = logging.getLogger("lockd")

T = TypeVar("T")


class AsyncLock(Lock):
    """What ``lock`` yields: a ``Lock`` whose ``lost`` is an ``asyncio.Event``."""

    def __init__(self, resource: str, response: Any) -> None:
        """Wraps an ``AcquireResponse`` for ``resource``."""
        super().__init__(resource, response)
        self.lost: asyncio.Event = asyncio.Event()  # type: ignore[assignment]


async def _with_retries(call: Callable[[Any], Awaitable[T]], request_for: Callable[[], Any],
                        retries: int, backoff: float, what: str) -> T:
    """Awaits ``call(request_for())`` and retries on ``RETRYABLE`` codes, with backoff."""
    for attempt in range(retries + 1):
        try:
            return await call(request_for())
        except grpc.aio.AioRpcError as e:
            if e.code() not in RETRYABLE or attempt == retries:
                raise
            log.info("%s failed with %s; retrying", what, e.code())
            await asyncio.sleep(_delay(attempt, backoff))
    raise AssertionError("unreachable")


async def _renew(stub: Any, lock: AsyncLock, token: str, ttl: float, valid_until: float,
                 rpc_timeout: float, backoff: float, call_metadata: Metadata) -> None:
    """Extends the lease every ``ttl / 3`` until cancelled; sets ``lock.lost`` when it cannot.
    ``valid_until`` is a ``time.monotonic()`` before which the lease surely still holds."""
    delay, failures = first_renewal(valid_until, ttl), 0
    while True:
        await asyncio.sleep(delay)
        sent = time.monotonic()
        left = valid_until - sent
        if left <= 0:
            log.warning("lock %s lost: could not renew it in time", lock.resource)
            lock.lost.set()
            return
        request = lock_pb2.ExtendRequest(resource=lock.resource, token=token,
                                          ttl=duration(ttl), replace_ttl=True)
        try:
            response = await stub.Extend(request, timeout=min(rpc_timeout, left),
                                         metadata=call_metadata)
        except grpc.aio.AioRpcError as e:
            # Keep trying until the lease may have expired: lockd or Redis may be back soon.
            log.warning("renewing lock %s failed: %s", lock.resource, e.code())
            delay = min(_delay(failures, backoff), max(valid_until - time.monotonic(), 0.0))
            failures += 1
            continue
        if not response.extended:
            log.warning("lock %s lost: renewal answered %s", lock.resource,
                        lock_pb2.LeaseStatus.Name(response.status))
            lock.lost.set()
            return
        # The new expiry is ttl after lockd ran the Extend, which was after `sent`.
        valid_until, delay, failures = sent + ttl, ttl / 3, 0


def _stub(target: Any, tls: Tls) -> Any:
    """Returns ``(stub, channel_to_close)`` for a stub, a ``grpc.aio.Channel`` or "host:port"."""
    if isinstance(target, str):
        creds = credentials(tls)
        channel = (grpc.aio.secure_channel(target, creds) if creds is not None
                   else grpc.aio.insecure_channel(target))
        return lock_pb2_grpc.LockServiceStub(channel), channel
    if isinstance(target, grpc.aio.Channel):
        return lock_pb2_grpc.LockServiceStub(target), None
    return target, None


@contextlib.asynccontextmanager
async def lock(
    target: Union[str, grpc.aio.Channel, "lock_pb2_grpc.LockServiceStub"],
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
) -> AsyncIterator[AsyncLock]:
    """Takes the lock on ``resource`` for the ``async with`` body; yields an ``AsyncLock``
    (truthy if acquired). The arguments are ``lockd_lock``'s; ``target`` is a stub over a
    ``grpc.aio`` channel, such a channel, or "host:port"."""
    stub, channel = _stub(target, tls)
    call_metadata = metadata(api_key)
    token = f"py-{uuid.uuid4()}"  # a secret: never logged, never shown by lockd
    deadline = time.monotonic() + wait if wait else None
    sent = 0.0
    hold = duration(min_hold) if min_hold else None

    def acquire_request() -> Any:
        """The AcquireRequest for one attempt: same token, the wait time that is left."""
        nonlocal sent
        request = lock_pb2.AcquireRequest(resource=resource, ttl=duration(ttl), owner=owner,
                                          token=token, labels=labels or {})
        if deadline is not None and deadline - time.monotonic() > 0.001:
            request.wait_timeout.CopyFrom(duration(deadline - time.monotonic()))
        sent = time.monotonic()
        return request

    def acquire(request: Any) -> Awaitable[Any]:
        """One Acquire call, allowed its wait time plus ``rpc_timeout``."""
        timeout = rpc_timeout + request.wait_timeout.ToNanoseconds() / 1e9
        return stub.Acquire(request, timeout=timeout, metadata=call_metadata)  # type: ignore[no-any-return]

    async def release(tries: int, min_hold_duration: Any = None) -> None:
        """Releases the lease; logs instead of raising (the lease expires by itself)."""
        request = lock_pb2.ReleaseRequest(resource=resource, token=token,
                                          min_hold=min_hold_duration)
        try:
            await _with_retries(
                lambda r: stub.Release(r, timeout=rpc_timeout, metadata=call_metadata),
                lambda: request, tries, backoff, "Release")
        except grpc.aio.AioRpcError as e:
            log.warning("could not release lock %s (it expires by itself): %s", resource, e.code())

    renewal: Optional[asyncio.Task[None]] = None
    try:
        try:
            response = await _with_retries(acquire, acquire_request, retries, backoff, "Acquire")
        except grpc.aio.AioRpcError:
            # A lost reply may have granted the lease: free it if lockd answers, else it expires.
            await release(0)
            raise
        acquired = AsyncLock(resource, response)
        if acquired:
            renewal = asyncio.create_task(_renew(stub, acquired, token, ttl, sent + ttl,
                                                 rpc_timeout, backoff, call_metadata))
        try:
            yield acquired
        finally:
            if renewal is not None:
                renewal.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewal
                # When lost, the lease is most likely gone already: one try, for a quick exit.
                await release(0 if acquired.lost.is_set() else retries, hold)
    finally:
        if channel is not None:
            await channel.close()
