"""Groups (jobs run in parallel) and chains (jobs run one after another), and their
stored form."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import msgpack

from ._codec import MAX_RECORD_SIZE, check_record_size, job_from_wire, unpack
from ._exceptions import DecodeError, InvalidInputError
from ._jobs import Job, Status, check_seconds, check_time, new_id, validate_id

__all__ = ["Chain", "ChainMessage", "Group", "GroupMessage", "ParentInfo"]

GROUP = "group"
CHAIN = "chain"


def _to_jobs(value: Sequence[Job]) -> tuple[Job, ...]:
    jobs = tuple(value)
    for job in jobs:
        if not isinstance(job, Job):
            raise InvalidInputError(f"expected Job instances, got {job!r}")
    ids = [job.id for job in jobs]
    if len(set(ids)) != len(ids):
        raise InvalidInputError("two jobs share an id")
    return jobs


def _check_timeout(inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        check_seconds(value, "timeout")


def _check_group_jobs(
    inst: object, attribute: attrs.Attribute[Any], value: tuple[Job, ...]
) -> None:
    if not value:
        raise InvalidInputError("a group needs at least one job")
    for job in value:
        if job.schedule is not None:
            raise InvalidInputError("a cron job cannot be a member of a group or chain")


def _check_chain_jobs(
    inst: object, attribute: attrs.Attribute[Any], value: tuple[Job, ...]
) -> None:
    if len(value) < 2:
        raise InvalidInputError("a chain needs at least 2 jobs (use a plain job for one)")
    for job in value:
        if job.schedule is not None:
            raise InvalidInputError("a cron job cannot be a member of a group or chain")


@attrs.frozen
class Group:
    """Jobs that run in parallel; successful only when all of them are.

    :param jobs: the member jobs (distinct ids)
    :param id: the group id (default: a random one)
    :param timeout: seconds from enqueue after which no member runs on: running members
        are stopped, queued ones never start (``cancelled``), and the group ``failed``
        (> 0 and at most 1e10)
    :param then: a job to run once every member succeeded (fan-in, Celery's chord): it
        receives the members' results, in the group's order, as a list: as its first
        argument when made with ``task.link(...)``, and as
        ``ctx.meta.prev_job_result`` (the codec's encoding of the list) in any case. When
        the group fails or is cancelled, it does not run (it gets no state)
    """

    jobs: tuple[Job, ...] = attrs.field(converter=_to_jobs, validator=_check_group_jobs)
    id: str = attrs.field(
        factory=new_id, kw_only=True, validator=lambda i, a, v: validate_id(v, "group id")
    )
    timeout: float | None = attrs.field(default=None, kw_only=True, validator=_check_timeout)
    then: Job | None = attrs.field(default=None, kw_only=True)

    def __attrs_post_init__(self) -> None:
        then = self.then
        if then is None:
            return
        if not isinstance(then, Job):
            raise InvalidInputError(f"then must be a Job, got {then!r}")
        if then.schedule is not None:
            raise InvalidInputError("a cron job cannot be a group's then job")
        if any(job.id == then.id for job in self.jobs):
            raise InvalidInputError(f"the then job's id {then.id!r} is a member's id")


@attrs.frozen
class Chain:
    """Jobs that run one after another, each receiving the previous one's saved result
    as ``ctx.meta.prev_job_result``; a failed link stops the chain.

    :param jobs: the links, in order (at least 2, distinct ids)
    :param id: the chain id (default: a random one)
    :param timeout: seconds from enqueue after which the chain stops: the running link
        is stopped, later links never start, and the chain ``failed`` (> 0 and at most 1e10)
    """

    jobs: tuple[Job, ...] = attrs.field(converter=_to_jobs, validator=_check_chain_jobs)
    id: str = attrs.field(
        factory=new_id, kw_only=True, validator=lambda i, a, v: validate_id(v, "chain id")
    )
    timeout: float | None = attrs.field(default=None, kw_only=True, validator=_check_timeout)


@attrs.frozen(kw_only=True)
class GroupMessage:
    """The state of a group, as :meth:`~tasqueue_anyio.Client.get_group` returns it.

    :ivar jobs: member job id → its status, in the group's order
    :ivar error: why the group failed or was cancelled
    :ivar deadline: POSIX time the group's timeout ends, if it has one
    """

    id: str
    status: Status
    jobs: dict[str, Status]
    created_at: float
    deadline: float | None
    error: str | None


@attrs.frozen(kw_only=True)
class ChainMessage:
    """The state of a chain, as :meth:`~tasqueue_anyio.Client.get_chain` returns it.

    :ivar current_job: the link running or next to run; once the chain ended, the last
        link if it succeeded, else the link that failed or was cancelled
    :ivar prev_jobs: the links before ``current_job``, in order
    :ivar jobs: link job id → its status, in order (links not reached yet are ``queued``)
    """

    id: str
    status: Status
    current_job: str
    prev_jobs: list[str]
    jobs: dict[str, Status]
    created_at: float
    deadline: float | None
    error: str | None


@attrs.frozen(kw_only=True)
class ParentInfo:
    """The decoded ``data`` of a stored group or chain."""

    kind: str
    id: str
    created_at: float
    deadline: float | None
    job_ids: tuple[str, ...]
    #: the encoded links of a chain (what the next link is built from); for a group, its
    #: ``then`` job (one element) or nothing
    links: tuple[Any, ...] = ()


def encode_parent(info: ParentInfo) -> bytes:
    """The stored form of a group or chain.

    :raises PayloadTooLargeError: over :data:`MAX_RECORD_SIZE`
        (what :func:`decode_parent` reads back)
    """
    return check_record_size(
        f"the record of {info.kind} {info.id}",
        msgpack.packb(
            [
                1,
                info.kind,
                info.id,
                info.created_at,
                info.deadline,
                list(info.job_ids),
                list(info.links),
            ],
            use_bin_type=True,
        ),
    )


def decode_parent(data: bytes) -> ParentInfo:
    """Read a stored group or chain, as untrusted as a message: bounded in size and
    depth, no extension types, every field checked (a chain's links as jobs).

    :raises DecodeError: not a group or chain record
    """
    v = unpack(data, MAX_RECORD_SIZE, "group/chain record")
    if type(v) is not list or len(v) != 7:
        raise DecodeError("malformed group/chain record: not an array of 7 fields")
    version, kind, parent_id, created_at, deadline, job_ids, links = v
    if (
        type(version) is not int
        or version != 1
        or kind not in (GROUP, CHAIN)
        or type(job_ids) is not list
        or not all(type(i) is str for i in job_ids)
        or type(links) is not list
    ):
        raise DecodeError("malformed group/chain record")
    try:
        validate_id(parent_id, f"{kind} id")
        for job_id in job_ids:
            validate_id(job_id)
        check_time(created_at, "created_at")
        if deadline is not None:
            check_time(deadline, "deadline")
    except InvalidInputError as exc:
        raise DecodeError(f"malformed group/chain record: {exc}") from exc
    if kind == CHAIN and len(links) != len(job_ids):
        raise DecodeError("malformed chain record: links and job ids differ")
    if kind == GROUP and len(links) > 1:
        raise DecodeError("malformed group record: more than one then job")
    for link in links:  # each becomes a message: check it now, not when it is due
        job_from_wire(link)
    return ParentInfo(
        kind=kind,
        id=parent_id,
        created_at=created_at,
        deadline=deadline,
        job_ids=tuple(job_ids),
        links=tuple(links),
    )


def parent_status(kind: str, counts: dict[str, int], total: int) -> Status | None:
    """The status a group or chain has given its members' status counts.

    A failed member fails the parent at once; a cancelled one cancels it; all members
    successful makes it successful; otherwise it is processing once any member started.
    ``None`` means "still queued".
    """
    if counts.get("failed"):
        return Status.FAILED
    if counts.get("cancelled"):
        return Status.CANCELLED
    if counts.get("successful", 0) >= total:
        return Status.SUCCESSFUL
    if counts.get("queued", 0) >= total:
        return None
    return Status.PROCESSING
