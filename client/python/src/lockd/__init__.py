"""lockd's Python client: locks from a lockd server, with renewal, loss detection and fencing
tokens.

Blocking code uses ``lockd_lock`` (renewal in a thread, ``lost`` a ``threading.Event``)::

    from lockd import lockd_lock

    with lockd_lock("127.0.0.1:50051", "nightly-scan", ttl=30, min_hold=20) as acquired:
        if acquired:
            run_job(acquired.fencing_token)
        else:
            print(f"skipping: already running on {acquired.holder.owner}")

asyncio code uses ``lock`` (over ``grpc.aio``; renewal in a task, ``lost`` an
``asyncio.Event``)::

    async with lockd.lock("127.0.0.1:50051", "nightly-scan", ttl=30) as acquired:
        ...

Both take ``api_key=`` (sent as ``authorization: Bearer <key>``) and ``tls=`` (True, or
credentials from ``tls_credentials``). The generated stubs are ``lockd.v1.lock_pb2`` and
``lockd.v1.lock_pb2_grpc``, for the calls these helpers do not wrap.
"""

from ._common import tls_credentials
from ._sync import Lock, lockd_lock
from .aio import AsyncLock, lock

__all__ = ["AsyncLock", "Lock", "lock", "lockd_lock", "tls_credentials"]
__version__ = "0.1.0"
