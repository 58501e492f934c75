"""The ``lockd`` package against a real lockd: tests/python.rs starts lockd and Redis, and runs
this file with ``LOCKD_TARGET`` set to lockd's "host:port"."""

from __future__ import annotations

import asyncio
import os
import time

import grpc
import pytest

import lockd
from lockd.v1 import lock_pb2, lock_pb2_grpc


@pytest.fixture(scope="module")
def target() -> str:
    """lockd's address. Missing means a setup error: fail, never skip."""
    address = os.environ.get("LOCKD_TARGET")
    assert address, "set LOCKD_TARGET to a running lockd's host:port (tests/python.rs does)"
    return address


@pytest.fixture(scope="module")
def stub(target: str) -> lock_pb2_grpc.LockServiceStub:
    """A plain stub, to look at locks from outside the context managers."""
    return lock_pb2_grpc.LockServiceStub(grpc.insecure_channel(target))


def locked(stub: lock_pb2_grpc.LockServiceStub, resource: str) -> bool:
    return bool(stub.IsLocked(lock_pb2.IsLockedRequest(resource=resource)).locked)


def test_async_lock_renews_past_its_ttl_and_releases_on_exit(target: str, stub) -> None:
    async def main() -> None:
        async with lockd.lock(target, "aio-renewed", ttl=0.6, owner="aio-check") as held:
            assert held and held.fencing_token and held.holder is None
            await asyncio.sleep(2)  # over three TTLs
            assert locked(stub, "aio-renewed") and not held.lost.is_set()
            async with lockd.lock(target, "aio-renewed", ttl=1) as other:
                assert not other and other.holder.owner == "aio-check"
    asyncio.run(main())
    assert not locked(stub, "aio-renewed"), "not released on exit"


def test_async_lock_is_released_when_the_body_raises(target: str, stub) -> None:
    async def main() -> None:
        async with lockd.lock(target, "aio-raising", ttl=30) as held:
            assert held
            raise RuntimeError("the job failed")
    with pytest.raises(RuntimeError):
        asyncio.run(main())
    assert not locked(stub, "aio-raising")


def test_async_lock_waits_for_a_release_and_gets_a_greater_fencing_token(target: str) -> None:
    async def main() -> None:
        async with lockd.lock(target, "aio-wait", ttl=5, min_hold=0.5) as first:
            assert first
        start = time.monotonic()
        async with lockd.lock(target, "aio-wait", ttl=5, wait=5) as second:
            waited = time.monotonic() - start
            assert second and second.fencing_token > first.fencing_token
            assert 0.3 < waited < 3, waited
    asyncio.run(main())


def test_an_api_key_is_sent_as_a_bearer_token_and_accepted(target: str) -> None:
    # lockd does not check keys yet: the call must simply work with the header set.
    assert lockd._common.metadata("k1") == (("authorization", "Bearer k1"),)
    with lockd.lockd_lock(target, "py-keyed", ttl=5, api_key="k1") as held:
        assert held

    async def main() -> None:
        async with lockd.lock(target, "aio-keyed", ttl=5, api_key="k1") as held:
            assert held
    asyncio.run(main())


def test_tls_options_make_secure_channel_credentials() -> None:
    assert isinstance(lockd.tls_credentials(), grpc.ChannelCredentials)
    assert lockd._common.credentials(None) is None
    assert isinstance(lockd._common.credentials(True), grpc.ChannelCredentials)


def test_the_package_is_typed() -> None:
    package = os.path.dirname(lockd.__file__)
    assert os.path.exists(os.path.join(package, "py.typed"))
    assert os.path.exists(os.path.join(package, "v1", "lock_pb2.pyi"))


def test_a_lock_granted_late_in_a_long_wait_is_renewed_at_once_not_reported_lost(target: str) -> None:
    # The holder keeps the lock for 0.8 s of the waiter's 1 s TTL: the waiter's lease, counted
    # from its Acquire's send, has at most 0.2 s left when granted; a first renewal a third of a
    # TTL later would come too late and report a loss that did not happen.
    with lockd.lockd_lock(target, "late-grant", ttl=5, min_hold=0.8) as first:
        assert first
    with lockd.lockd_lock(target, "late-grant", ttl=1, wait=5) as late:
        assert late
        time.sleep(1.5)
        assert not late.lost.is_set()


def test_an_async_lock_granted_late_in_a_long_wait_is_renewed_at_once(target: str) -> None:
    async def main() -> None:
        async with lockd.lock(target, "aio-late-grant", ttl=5, min_hold=0.8) as first:
            assert first
        async with lockd.lock(target, "aio-late-grant", ttl=1, wait=5) as late:
            assert late
            await asyncio.sleep(1.5)
            assert not late.lost.is_set()

    asyncio.run(main())
