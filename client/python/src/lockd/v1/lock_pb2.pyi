import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LeaseStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LEASE_STATUS_UNSPECIFIED: _ClassVar[LeaseStatus]
    LEASE_STATUS_OK: _ClassVar[LeaseStatus]
    LEASE_STATUS_NOT_HELD: _ClassVar[LeaseStatus]
    LEASE_STATUS_HELD_BY_OTHER: _ClassVar[LeaseStatus]

class LockEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOCK_EVENT_TYPE_UNSPECIFIED: _ClassVar[LockEventType]
    LOCK_EVENT_TYPE_ACQUIRED: _ClassVar[LockEventType]
    LOCK_EVENT_TYPE_EXTENDED: _ClassVar[LockEventType]
    LOCK_EVENT_TYPE_RELEASED: _ClassVar[LockEventType]
    LOCK_EVENT_TYPE_EXPIRED: _ClassVar[LockEventType]
LEASE_STATUS_UNSPECIFIED: LeaseStatus
LEASE_STATUS_OK: LeaseStatus
LEASE_STATUS_NOT_HELD: LeaseStatus
LEASE_STATUS_HELD_BY_OTHER: LeaseStatus
LOCK_EVENT_TYPE_UNSPECIFIED: LockEventType
LOCK_EVENT_TYPE_ACQUIRED: LockEventType
LOCK_EVENT_TYPE_EXTENDED: LockEventType
LOCK_EVENT_TYPE_RELEASED: LockEventType
LOCK_EVENT_TYPE_EXPIRED: LockEventType

class Lease(_message.Message):
    __slots__ = ("resource", "token", "fencing_token", "expires_at", "ttl")
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    resource: str
    token: str
    fencing_token: int
    expires_at: _timestamp_pb2.Timestamp
    ttl: _duration_pb2.Duration
    def __init__(self, resource: _Optional[str] = ..., token: _Optional[str] = ..., fencing_token: _Optional[int] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class LockInfo(_message.Message):
    __slots__ = ("resource", "owner", "fencing_token", "acquired_at", "expires_at", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ACQUIRED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    resource: str
    owner: str
    fencing_token: int
    acquired_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    labels: _containers.ScalarMap[str, str]
    def __init__(self, resource: _Optional[str] = ..., owner: _Optional[str] = ..., fencing_token: _Optional[int] = ..., acquired_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class LeaseRef(_message.Message):
    __slots__ = ("resource", "token", "ttl")
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    resource: str
    token: str
    ttl: _duration_pb2.Duration
    def __init__(self, resource: _Optional[str] = ..., token: _Optional[str] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class AcquireRequest(_message.Message):
    __slots__ = ("resource", "ttl", "wait_timeout", "owner", "token", "labels", "limit", "fair")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    WAIT_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    FAIR_FIELD_NUMBER: _ClassVar[int]
    resource: str
    ttl: _duration_pb2.Duration
    wait_timeout: _duration_pb2.Duration
    owner: str
    token: str
    labels: _containers.ScalarMap[str, str]
    limit: int
    fair: bool
    def __init__(self, resource: _Optional[str] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., wait_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., owner: _Optional[str] = ..., token: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., limit: _Optional[int] = ..., fair: _Optional[bool] = ...) -> None: ...

class AcquireResponse(_message.Message):
    __slots__ = ("acquired", "lease", "holder")
    ACQUIRED_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    acquired: bool
    lease: Lease
    holder: LockInfo
    def __init__(self, acquired: _Optional[bool] = ..., lease: _Optional[_Union[Lease, _Mapping]] = ..., holder: _Optional[_Union[LockInfo, _Mapping]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("resource", "token", "keep_until", "min_hold")
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    KEEP_UNTIL_FIELD_NUMBER: _ClassVar[int]
    MIN_HOLD_FIELD_NUMBER: _ClassVar[int]
    resource: str
    token: str
    keep_until: _timestamp_pb2.Timestamp
    min_hold: _duration_pb2.Duration
    def __init__(self, resource: _Optional[str] = ..., token: _Optional[str] = ..., keep_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., min_hold: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released", "status", "frees_at")
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    FREES_AT_FIELD_NUMBER: _ClassVar[int]
    released: bool
    status: LeaseStatus
    frees_at: _timestamp_pb2.Timestamp
    def __init__(self, released: _Optional[bool] = ..., status: _Optional[_Union[LeaseStatus, str]] = ..., frees_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ExtendRequest(_message.Message):
    __slots__ = ("resource", "token", "ttl", "replace_ttl")
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    REPLACE_TTL_FIELD_NUMBER: _ClassVar[int]
    resource: str
    token: str
    ttl: _duration_pb2.Duration
    replace_ttl: bool
    def __init__(self, resource: _Optional[str] = ..., token: _Optional[str] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., replace_ttl: _Optional[bool] = ...) -> None: ...

class ExtendResponse(_message.Message):
    __slots__ = ("extended", "lease", "status")
    EXTENDED_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    extended: bool
    lease: Lease
    status: LeaseStatus
    def __init__(self, extended: _Optional[bool] = ..., lease: _Optional[_Union[Lease, _Mapping]] = ..., status: _Optional[_Union[LeaseStatus, str]] = ...) -> None: ...

class IsLockedRequest(_message.Message):
    __slots__ = ("resource",)
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    resource: str
    def __init__(self, resource: _Optional[str] = ...) -> None: ...

class IsLockedResponse(_message.Message):
    __slots__ = ("locked", "remaining", "holders", "limit")
    LOCKED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    HOLDERS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    locked: bool
    remaining: _duration_pb2.Duration
    holders: int
    limit: int
    def __init__(self, locked: _Optional[bool] = ..., remaining: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., holders: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class GetOwnerRequest(_message.Message):
    __slots__ = ("resource",)
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    resource: str
    def __init__(self, resource: _Optional[str] = ...) -> None: ...

class GetOwnerResponse(_message.Message):
    __slots__ = ("holder", "holders", "limit")
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    HOLDERS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    holder: LockInfo
    holders: _containers.RepeatedCompositeFieldContainer[LockInfo]
    limit: int
    def __init__(self, holder: _Optional[_Union[LockInfo, _Mapping]] = ..., holders: _Optional[_Iterable[_Union[LockInfo, _Mapping]]] = ..., limit: _Optional[int] = ...) -> None: ...

class KeepAliveRequest(_message.Message):
    __slots__ = ("keep", "release", "expire_on_close")
    KEEP_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_ON_CLOSE_FIELD_NUMBER: _ClassVar[int]
    keep: _containers.RepeatedCompositeFieldContainer[LeaseRef]
    release: _containers.RepeatedCompositeFieldContainer[LeaseRef]
    expire_on_close: bool
    def __init__(self, keep: _Optional[_Iterable[_Union[LeaseRef, _Mapping]]] = ..., release: _Optional[_Iterable[_Union[LeaseRef, _Mapping]]] = ..., expire_on_close: _Optional[bool] = ...) -> None: ...

class LeaseState(_message.Message):
    __slots__ = ("resource", "status", "fencing_token", "expires_at", "released")
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    resource: str
    status: LeaseStatus
    fencing_token: int
    expires_at: _timestamp_pb2.Timestamp
    released: bool
    def __init__(self, resource: _Optional[str] = ..., status: _Optional[_Union[LeaseStatus, str]] = ..., fencing_token: _Optional[int] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., released: _Optional[bool] = ...) -> None: ...

class KeepAliveResponse(_message.Message):
    __slots__ = ("leases",)
    LEASES_FIELD_NUMBER: _ClassVar[int]
    leases: _containers.RepeatedCompositeFieldContainer[LeaseState]
    def __init__(self, leases: _Optional[_Iterable[_Union[LeaseState, _Mapping]]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("resource", "prefix")
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    resource: str
    prefix: str
    def __init__(self, resource: _Optional[str] = ..., prefix: _Optional[str] = ...) -> None: ...

class LockEvent(_message.Message):
    __slots__ = ("type", "resource", "owner", "fencing_token", "time", "expires_at")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    type: LockEventType
    resource: str
    owner: str
    fencing_token: int
    time: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, type: _Optional[_Union[LockEventType, str]] = ..., resource: _Optional[str] = ..., owner: _Optional[str] = ..., fencing_token: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class WatchResponse(_message.Message):
    __slots__ = ("event", "missed")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    MISSED_FIELD_NUMBER: _ClassVar[int]
    event: LockEvent
    missed: int
    def __init__(self, event: _Optional[_Union[LockEvent, _Mapping]] = ..., missed: _Optional[int] = ...) -> None: ...

class ListLocksRequest(_message.Message):
    __slots__ = ("prefix", "page_size", "page_token")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    page_size: int
    page_token: str
    def __init__(self, prefix: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListLocksResponse(_message.Message):
    __slots__ = ("locks", "next_page_token")
    LOCKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    locks: _containers.RepeatedCompositeFieldContainer[LockInfo]
    next_page_token: str
    def __init__(self, locks: _Optional[_Iterable[_Union[LockInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("request_id", "expire_on_close", "acquire", "release", "extend", "heartbeat", "cancel")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_ON_CLOSE_FIELD_NUMBER: _ClassVar[int]
    ACQUIRE_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    EXTEND_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    expire_on_close: bool
    acquire: AcquireRequest
    release: ReleaseRequest
    extend: ExtendRequest
    heartbeat: SessionHeartbeat
    cancel: SessionCancel
    def __init__(self, request_id: _Optional[int] = ..., expire_on_close: _Optional[bool] = ..., acquire: _Optional[_Union[AcquireRequest, _Mapping]] = ..., release: _Optional[_Union[ReleaseRequest, _Mapping]] = ..., extend: _Optional[_Union[ExtendRequest, _Mapping]] = ..., heartbeat: _Optional[_Union[SessionHeartbeat, _Mapping]] = ..., cancel: _Optional[_Union[SessionCancel, _Mapping]] = ...) -> None: ...

class SessionCancel(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SessionHeartbeat(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SessionLease(_message.Message):
    __slots__ = ("bound_by", "resource", "status")
    BOUND_BY_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    bound_by: int
    resource: str
    status: LeaseStatus
    def __init__(self, bound_by: _Optional[int] = ..., resource: _Optional[str] = ..., status: _Optional[_Union[LeaseStatus, str]] = ...) -> None: ...

class SessionHeartbeatResponse(_message.Message):
    __slots__ = ("renewed", "lost")
    RENEWED_FIELD_NUMBER: _ClassVar[int]
    LOST_FIELD_NUMBER: _ClassVar[int]
    renewed: int
    lost: _containers.RepeatedCompositeFieldContainer[SessionLease]
    def __init__(self, renewed: _Optional[int] = ..., lost: _Optional[_Iterable[_Union[SessionLease, _Mapping]]] = ...) -> None: ...

class SessionLeasesLost(_message.Message):
    __slots__ = ("leases",)
    LEASES_FIELD_NUMBER: _ClassVar[int]
    leases: _containers.RepeatedCompositeFieldContainer[SessionLease]
    def __init__(self, leases: _Optional[_Iterable[_Union[SessionLease, _Mapping]]] = ...) -> None: ...

class SessionError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class SessionResponse(_message.Message):
    __slots__ = ("request_id", "acquire", "release", "extend", "heartbeat", "error", "lost")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ACQUIRE_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    EXTEND_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LOST_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    acquire: AcquireResponse
    release: ReleaseResponse
    extend: ExtendResponse
    heartbeat: SessionHeartbeatResponse
    error: SessionError
    lost: SessionLeasesLost
    def __init__(self, request_id: _Optional[int] = ..., acquire: _Optional[_Union[AcquireResponse, _Mapping]] = ..., release: _Optional[_Union[ReleaseResponse, _Mapping]] = ..., extend: _Optional[_Union[ExtendResponse, _Mapping]] = ..., heartbeat: _Optional[_Union[SessionHeartbeatResponse, _Mapping]] = ..., error: _Optional[_Union[SessionError, _Mapping]] = ..., lost: _Optional[_Union[SessionLeasesLost, _Mapping]] = ...) -> None: ...
