"""The Redis results store, on coredis. Runs on Trio and asyncio.

Keys
----
Every key starts with the prefix ``P`` (default ``tasqueue``). The kind of a key comes
*before* the id, and the id is the key's hash tag, so no id can reach a key of another
kind, and the keys of one job (or one group or chain) share a Redis Cluster slot::

    P:s:{ID}          hash    job state: st (status), d (message), c ("1": cancel requested),
                              r (the run token of the run that wrote it)
    P:r:{ID}          string  the job's saved result
    P:p:{ID}          hash    group or chain: k (kind), st (status), d (data), e (error)
    P:pm:{ID}         hash    its members: job id -> status
    P:pc:{ID}         hash    its member counts: status -> number of members
    P:{l}:success     zset    ids of jobs that ended successful, scored by end order
    P:{l}:failed      zset    ids of jobs that ended failed, scored by end order
    P:{l}:seq         string  the end-order counter
    P:{sched}:data    hash    schedule id -> encoded job
    P:{sched}:fire    hash    schedule id -> repr() of its next fire time
    P:{w}:workers     hash    worker id -> its encoded WorkerRecord
    P:{w}:alive       zset    worker id, scored by when its record expires (ms, Redis clock)

Every conditional write (``start_job``, ``update_job``, ``request_cancel``,
``set_member_status``, ``set_parent_status``, ``advance_schedule``) is one Lua script, so
it is atomic, and sets the key's expiry in the same script. Fire times are stored as
``repr(float)``, which reads back as the same float, so ``advance_schedule`` compares
exactly.

The worker registry is two keys of one hash tag (so one slot of a cluster): each of
``put_worker``, ``get_workers`` and ``remove_worker`` is one script, and the first two
drop the records whose expiry (by the Redis clock, ``TIME``) has passed first.

On a single Redis server the listing update of ``update_job`` happens in the job's
script, and a listing read drops the ids whose state expired in one script. Every call
goes through a write-combiner: concurrent calls share one round trip.

Redis Cluster
-------------
The layout is the same on a cluster (the same keys, so a store can move between a
single server and a cluster with its data). Each job's keys, each group's or chain's and
the schedules have a hash tag of their own, so every script on them stays on one slot,
and jobs spread over the masters by id. Keeping them atomic together with the listings
would take one hash tag for every key of the prefix, that is the whole store on one
master (its memory, its CPU) and no spreading at all; this module takes the other side
of the trade, and on a cluster (``cluster``) three calls become two steps:

- ``start_job`` and ``update_job`` write the job's state (one script, as before), then,
  if they wrote ``successful`` or ``failed``, move the id into its listing (a second
  script, on the listings' slot): one more round trip for a job that ends. A client
  that dies between the two leaves the job out of the listing; its state is right.
- ``delete_job`` deletes the state and result (one script) and removes the id from the
  listings (``ZREM``), pipelined together.
- A listing read checks, with one ``EXISTS`` per id (pipelined), which listed jobs still
  have a state, and drops the others from the listing (a script that removes an id only
  while it has the score it was read with, so a job listed again meanwhile stays). It
  does this with or without ``job_ttl``, so a delete cut in half is never shown.

``set_jobs`` and ``create_jobs`` run one script per slot among the jobs they write,
pipelined: each job is written (or created) atomically, not the batch as a whole.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from coredis.typing import Key

from .._exceptions import (
    DecodeError,
    InvalidInputError,
    JobNotFoundError,
    NotFoundError,
    ResultNotFoundError,
)
from .._redis import DEFAULT_PREFIX, Client, RedisBackend, evalsha, translate_errors
from ..abc import (
    FINAL_STATUSES,
    Delivery,
    JobRecord,
    ParentRecord,
    ResultCounts,
    Results,
    ScheduleRecord,
    WorkerRecord,
    check_progress,
    check_worker_ttl,
    refuse_result,
)
from ..brokers.redis import _LUA_ACK as _BROKER_ACK
from ..brokers.redis import _LUA_COMMON as _BROKER_COMMON
from ..brokers.redis import RedisDelivery

__all__ = ["RedisResults"]

_log = logging.getLogger("tasqueue_anyio.redis")

_LUA_COMMON = r"""
local FINAL = {successful = true, failed = true, cancelled = true}

local function expire(ttl, ...)
  if ttl > 0 then
    for _, key in ipairs({...}) do
      redis.call('PEXPIRE', key, ttl)
    end
  end
end

-- the listings: KEYS[k] success, KEYS[k+1] failed, KEYS[k+2] end-order counter (k is
-- 2 unless given); without them (Redis Cluster) the caller lists the job separately
local function list_end(status, id, k)
  k = k or 2
  if #KEYS < k + 2 then
    return
  end
  if status == 'successful' then
    redis.call('ZREM', KEYS[k + 1], id)
    redis.call('ZADD', KEYS[k], redis.call('INCR', KEYS[k + 2]), id)
  elseif status == 'failed' then
    redis.call('ZREM', KEYS[k], id)
    redis.call('ZADD', KEYS[k + 1], redis.call('INCR', KEYS[k + 2]), id)
  end
end

-- the try of a run token '<retried>.<attempt>.<nonce>' (nil for none): see abc.may_start
local function run_retry(run)
  if not run then
    return nil
  end
  local n = string.match(run, '^(%d+)%.')
  return n and tonumber(n)
end

local function hset_pairs(key, items, first)
  local n = #items
  local i = first
  while i <= n do
    local j = math.min(i + 999, n)
    redis.call('HSET', key, unpack(items, i, j))
    i = j + 1
  end
end
"""

# KEYS: state, success, failed, seq. ARGV: id, status, data, cancel, ttl ms, run token.
# Returns 0 when written, else the current {st, d, c, r, p}. A new run clears the progress.
_LUA_START = r"""
local cur = redis.call('HMGET', KEYS[1], 'st', 'd', 'c', 'r', 'p')
if cur[1] then
  if FINAL[cur[1]] or cur[3] == '1' then
    return cur
  end
  local new, stored = run_retry(ARGV[6]), run_retry(cur[4])
  if new and stored and (new < stored or (cur[1] == 'retrying' and new == stored)) then
    return cur
  end
end
redis.call('HDEL', KEYS[1], 'p')
redis.call('HSET', KEYS[1], 'st', ARGV[2], 'd', ARGV[3], 'c', ARGV[4], 'r', ARGV[6])
expire(tonumber(ARGV[5]), KEYS[1])
list_end(ARGV[2], ARGV[1])
return 0
"""

# KEYS: state, result, success, failed, seq. ARGV: id, status, data, ttl ms, run token
# to check ('' for none), run token to write, has result ('1' or '0'), result, result
# ttl ms, hold ms, own ttl ('1': the ttls are the job's own, applied to a result saved
# earlier too), expected statuses... The result is stored in the same step, only if
# written; the progress is kept. A successful or failed status with a hold keeps the
# job's id taken until then (field 'u', Redis clock in ms; see claim_jobs).
_LUA_UPDATE = r"""
local cur = redis.call('HMGET', KEYS[1], 'st', 'r')
local st = cur[1]
if not st then
  return 0
end
if ARGV[5] ~= '' and cur[2] ~= ARGV[5] then
  return 0
end
local ok = false
for i = 12, #ARGV do
  if ARGV[i] == st then
    ok = true
    break
  end
end
if not ok then
  return 0
end
redis.call('HSET', KEYS[1], 'st', ARGV[2], 'd', ARGV[3], 'r', ARGV[6])
local hold = tonumber(ARGV[10])
if hold > 0 and (ARGV[2] == 'successful' or ARGV[2] == 'failed') then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'u', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + hold)
end
expire(tonumber(ARGV[4]), KEYS[1])
if ARGV[7] == '1' then
  local rttl = tonumber(ARGV[9])
  if rttl > 0 then
    redis.call('SET', KEYS[2], ARGV[8], 'PX', rttl)
  else
    redis.call('SET', KEYS[2], ARGV[8])
  end
elseif ARGV[11] == '1' then
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[9]))
end
list_end(ARGV[2], ARGV[1], 3)
return 1
"""

# KEYS: state. ARGV: progress, run token. Stores the progress only while the job is
# processing under that run.
_LUA_SET_PROGRESS = r"""
local cur = redis.call('HMGET', KEYS[1], 'st', 'r')
if cur[1] ~= 'processing' or cur[2] ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], 'p', ARGV[1])
return 1
"""

# KEYS: state, result. ARGV: data, result ttl ms, run token. Stores the result only
# while the job is processing under that run.
_LUA_SET_RESULT = r"""
local cur = redis.call('HMGET', KEYS[1], 'st', 'r')
if cur[1] ~= 'processing' or cur[2] ~= ARGV[3] then
  return 0
end
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ttl)
else
  redis.call('SET', KEYS[2], ARGV[1])
end
return 1
"""

# KEYS: state. ARGV: ttl ms. Returns 0 (no state) or {st, d, c, r, p} after the call.
_LUA_CANCEL = r"""
local cur = redis.call('HMGET', KEYS[1], 'st', 'd', 'c', 'r', 'p')
local st = cur[1]
if not st then
  return 0
end
if FINAL[st] then
  return cur
end
if st == 'queued' or st == 'retrying' then
  redis.call('HSET', KEYS[1], 'st', 'cancelled')
  cur[1] = 'cancelled'
elseif cur[3] == '1' then
  return cur
else
  redis.call('HSET', KEYS[1], 'c', '1')
  cur[3] = '1'
end
expire(tonumber(ARGV[1]), KEYS[1])
return cur
"""

# KEYS: state keys. ARGV: ttl ms, then status, data, cancel, run token per key. A new
# state: any progress of an earlier one goes.
_LUA_SET_JOBS = r"""
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS do
  local a = 2 + (i - 1) * 4
  redis.call('HDEL', KEYS[i], 'p', 'u')
  redis.call('HSET', KEYS[i], 'st', ARGV[a], 'd', ARGV[a + 1], 'c', ARGV[a + 2], 'r', ARGV[a + 3])
  if ttl > 0 then
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
end
return 1
"""

# KEYS: state keys. ARGV: ttl ms, then status, data, cancel, run token per key. Writes
# only the states that do not exist; returns the (1-based) indexes of those it wrote.
_LUA_CREATE_JOBS = r"""
local ttl = tonumber(ARGV[1])
local created = {}
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    local a = 2 + (i - 1) * 4
    redis.call('HSET', KEYS[i], 'st', ARGV[a], 'd', ARGV[a + 1], 'c', ARGV[a + 2], 'r', ARGV[a + 3])
    if ttl > 0 then
      redis.call('PEXPIRE', KEYS[i], ttl)
    end
    created[#created + 1] = i
  end
end
return created
"""

# KEYS: state keys. ARGV: ttl ms, then status, data, cancel, run token per key. Writes
# the states whose id is free: no state, or a final one whose hold ('u', ms) passed.
# Returns the (1-based) indexes of those it did NOT write (usually none: a short reply).
_LUA_CLAIM_JOBS = r"""
local ttl = tonumber(ARGV[1])
local taken = {}
local now_ms = nil
for i = 1, #KEYS do
  -- a new id (the usual case) costs one EXISTS, as create_jobs
  local exists = redis.call('EXISTS', KEYS[i]) == 1
  local free = not exists
  if exists then
    local cur = redis.call('HMGET', KEYS[i], 'st', 'u')
    if FINAL[cur[1]] then
      free = true
      if cur[2] then
        if not now_ms then
          local t = redis.call('TIME')
          now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
        end
        free = tonumber(cur[2]) <= now_ms
      end
    end
  end
  if free then
    local a = 2 + (i - 1) * 4
    if exists then
      redis.call('HDEL', KEYS[i], 'p', 'u')
    end
    redis.call('HSET', KEYS[i], 'st', ARGV[a], 'd', ARGV[a + 1], 'c', ARGV[a + 2], 'r', ARGV[a + 3])
    if ttl > 0 then
      redis.call('PEXPIRE', KEYS[i], ttl)
    end
  else
    taken[#taken + 1] = i
  end
end
return taken
"""

# KEYS: state, result, success, failed (no listings on Redis Cluster). ARGV: id.
_LUA_DELETE = r"""
redis.call('DEL', KEYS[1], KEYS[2])
if #KEYS > 2 then
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('ZREM', KEYS[4], ARGV[1])
end
return 1
"""

# Redis Cluster only. KEYS: success, failed, seq. ARGV: id, status. The second step of a
# start_job or update_job that wrote a final status.
_LUA_LIST = r"""
list_end(ARGV[2], ARGV[1], 1)
return 1
"""

# Redis Cluster only. KEYS: listing. ARGV: id, score pairs. Drops each id whose score is
# still the one given (its job's state was found gone).
_LUA_UNLIST_GONE = r"""
local n = 0
for i = 1, #ARGV, 2 do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) == tonumber(ARGV[i + 1]) then
    n = n + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return n
"""

# KEYS: listing. ARGV: state key prefix, suffix. Listed ids whose state is gone
# (expired) leave the listing. Single server only: the state keys are built here.
_LUA_LISTING = r"""
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
local out, gone = {}, {}
for _, id in ipairs(ids) do
  if redis.call('EXISTS', ARGV[1] .. id .. ARGV[2]) == 1 then
    out[#out + 1] = id
  else
    gone[#gone + 1] = id
  end
end
for i = 1, #gone, 1000 do
  redis.call('ZREM', KEYS[1], unpack(gone, i, math.min(i + 999, #gone)))
end
return out
"""

# KEYS: parent, members, counts. ARGV: ttl ms, kind, status, data, has error, error,
# then member id, status pairs.
_LUA_SET_PARENT = r"""
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
if ARGV[5] == '1' then
  redis.call('HSET', KEYS[1], 'k', ARGV[2], 'st', ARGV[3], 'd', ARGV[4], 'e', ARGV[6])
else
  redis.call('HSET', KEYS[1], 'k', ARGV[2], 'st', ARGV[3], 'd', ARGV[4])
end
if #ARGV > 6 then
  hset_pairs(KEYS[2], ARGV, 7)
  local counts = {}
  for i = 8, #ARGV, 2 do
    counts[ARGV[i]] = (counts[ARGV[i]] or 0) + 1
  end
  local flat = {}
  for status, n in pairs(counts) do
    flat[#flat + 1] = status
    flat[#flat + 1] = n
  end
  redis.call('HSET', KEYS[3], unpack(flat))
end
expire(tonumber(ARGV[1]), KEYS[1], KEYS[2], KEYS[3])
return 1
"""

# KEYS: parent, members. Returns 0 or {{k, st, d, e}, {member, status, ...}}.
_LUA_GET_PARENT = r"""
local fields = redis.call('HMGET', KEYS[1], 'k', 'st', 'd', 'e')
if not fields[1] then
  return 0
end
return {fields, redis.call('HGETALL', KEYS[2])}
"""

# KEYS: parent, members, counts. ARGV: ttl ms, job id, status.
# Returns 0 (no parent) or the counts {status, n, ...}.
_LUA_SET_MEMBER = r"""
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local old = redis.call('HGET', KEYS[2], ARGV[2])
if old ~= ARGV[3] then
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
  if old then
    if redis.call('HINCRBY', KEYS[3], old, -1) <= 0 then
      redis.call('HDEL', KEYS[3], old)
    end
  end
  redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
end
expire(tonumber(ARGV[1]), KEYS[1], KEYS[2], KEYS[3])
return redis.call('HGETALL', KEYS[3])
"""

# KEYS: parent, members, counts. ARGV: ttl ms, status, has error, error, expected...
_LUA_SET_PARENT_STATUS = r"""
local st = redis.call('HGET', KEYS[1], 'st')
if not st then
  return 0
end
local ok = false
for i = 5, #ARGV do
  if ARGV[i] == st then
    ok = true
    break
  end
end
if not ok then
  return 0
end
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], 'st', ARGV[2], 'e', ARGV[4])
else
  redis.call('HSET', KEYS[1], 'st', ARGV[2])
end
expire(tonumber(ARGV[1]), KEYS[1], KEYS[2], KEYS[3])
return 1
"""

# KEYS: schedule data, fire times. ARGV: id, data, fire.
_LUA_SET_SCHEDULE = r"""
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return 1
"""

# KEYS: schedule data, fire times. Returns {{id, data, ...}, {id, fire, ...}}.
_LUA_GET_SCHEDULES = r"""
return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}
"""

# KEYS: schedule data, fire times. ARGV: id, expected fire, next fire.
_LUA_ADVANCE = r"""
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return 1
"""

# KEYS: schedule data, fire times. ARGV: id.
_LUA_DELETE_SCHEDULE = r"""
redis.call('HDEL', KEYS[1], ARGV[1])
return redis.call('HDEL', KEYS[2], ARGV[1])
"""

# The worker registry. KEYS: workers (id -> record), alive (id scored by expiry, ms on
# the Redis clock). drop_expired() removes the records whose expiry passed and returns
# the time now (ms).
_LUA_WORKERS = r"""
local function drop_expired()
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
  for i = 1, #gone, 1000 do
    local j = math.min(i + 999, #gone)
    redis.call('HDEL', KEYS[1], unpack(gone, i, j))
    redis.call('ZREM', KEYS[2], unpack(gone, i, j))
  end
  return now
end
"""

# ARGV: id, record, ttl ms.
_LUA_PUT_WORKER = r"""
local now = drop_expired()
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
return 1
"""

# Returns the records of the live workers (in expiry order).
_LUA_GET_WORKERS = r"""
drop_expired()
local ids = redis.call('ZRANGE', KEYS[2], 0, -1)
local out = {}
for i = 1, #ids, 1000 do
  local records = redis.call('HMGET', KEYS[1], unpack(ids, i, math.min(i + 999, #ids)))
  for _, record in ipairs(records) do
    if record then
      out[#out + 1] = record
    end
  end
end
return out
"""

# ARGV: id.
_LUA_REMOVE_WORKER = r"""
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

# The end of a run and the ack of its delivery in one script (a Redis broker on the same
# server): the update script (KEYS: state, result, success, failed, seq) and the broker's ack
# script (KEYS: the queue's nine) as functions of their own KEYS and ARGV.
# ARGV: update count u, then u update arguments, announce count n, then n (channel,
# message) pairs published if both happened, then the ack's arguments.
# Returns 2 * written + acked.
_LUA_FINISH = (
    "local function update_part(KEYS, ARGV)\n"
    + _LUA_COMMON
    + _LUA_UPDATE
    + "end\nlocal function ack_part(KEYS, ARGV)\n"
    + _BROKER_COMMON
    + _BROKER_ACK
    + r"""end
local nu = tonumber(ARGV[1])
local na = tonumber(ARGV[2 + nu])
local first_ack = 3 + nu + 2 * na
local uk, ak, ua, aa = {}, {}, {}, {}
for i = 1, 5 do uk[i] = KEYS[i] end
for i = 6, #KEYS do ak[#ak + 1] = KEYS[i] end
for i = 2, 1 + nu do ua[#ua + 1] = ARGV[i] end
for i = first_ack, #ARGV do aa[#aa + 1] = ARGV[i] end
local written = update_part(uk, ua)
local acked = ack_part(ak, aa)
if written == 1 and acked == 1 then
  for i = 3 + nu, first_ack - 1, 2 do
    redis.call('PUBLISH', ARGV[i], ARGV[i + 1])
  end
end
return 2 * written + acked
"""
)

_SCRIPTS = {
    name: _LUA_COMMON + source
    for name, source in {
        "start": _LUA_START,
        "update": _LUA_UPDATE,
        "set_result": _LUA_SET_RESULT,
        "set_progress": _LUA_SET_PROGRESS,
        "cancel": _LUA_CANCEL,
        "set_jobs": _LUA_SET_JOBS,
        "create_jobs": _LUA_CREATE_JOBS,
        "claim_jobs": _LUA_CLAIM_JOBS,
        "delete": _LUA_DELETE,
        "list": _LUA_LIST,
        "unlist_gone": _LUA_UNLIST_GONE,
        "listing": _LUA_LISTING,
        "set_parent": _LUA_SET_PARENT,
        "get_parent": _LUA_GET_PARENT,
        "set_member": _LUA_SET_MEMBER,
        "set_parent_status": _LUA_SET_PARENT_STATUS,
        "set_schedule": _LUA_SET_SCHEDULE,
        "get_schedules": _LUA_GET_SCHEDULES,
        "advance": _LUA_ADVANCE,
        "delete_schedule": _LUA_DELETE_SCHEDULE,
        "put_worker": _LUA_WORKERS + _LUA_PUT_WORKER,
        "get_workers": _LUA_WORKERS + _LUA_GET_WORKERS,
        "remove_worker": _LUA_REMOVE_WORKER,
    }.items()
}
_SCRIPTS["finish"] = _LUA_FINISH


_FIELDS = ("st", "d", "c", "r", "p")


def _evalsha(sha: bytes, keys: Any, args: Any) -> Callable[[Any], Any]:
    return lambda client: evalsha(client, sha, keys, args)


def _zrem(key: bytes, member: str) -> Callable[[Any], Any]:
    return lambda client: client.zrem(key, [member])


def _zcard(key: bytes) -> Callable[[Any], Any]:
    return lambda client: client.zcard(key)


def _exists(key: str) -> Callable[[Any], Any]:
    return lambda client: client.exists([key])


def _raise_first(replies: list[Any]) -> None:
    """Raise the first exception among the replies of :meth:`Commands.gather`."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply


def _ttl_ms(ttl: float | None, what: str) -> int:
    if ttl is None:
        return 0
    if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or ttl <= 0:
        raise InvalidInputError(f"{what} must be seconds > 0 or None, got {ttl!r}")
    return max(1, round(ttl * 1000))


def _check_id(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidInputError(f"a {what} must be a non-empty str, got {value!r}")
    return value


def _record(fields: list[Any]) -> JobRecord:
    status, data, cancel, run, progress = fields
    return JobRecord(
        status=status.decode(),
        data=data or b"",
        cancel_requested=cancel == b"1",
        run=run.decode() if run else "",
        progress=bytes(progress) if progress else None,
    )


def _counts(flat: list[Any]) -> dict[str, int]:
    return {flat[i].decode(): int(flat[i + 1]) for i in range(0, len(flat), 2)}


class RedisResults(RedisBackend, Results):
    """A :class:`~tasqueue_anyio.abc.Results` store on Redis, via coredis.

    Open it with ``async with`` (it owns its connections unless given a ``client``;
    entering it again is counted).

    The success and failed listings hold each job id at most once, in the order the jobs
    ended; a job that ends again moves to the end of the listing of its new status. A
    listing only shows jobs whose state is still stored.

    :param url: ``redis://[[user]:password@]host[:port][/db]`` or ``rediss://...`` (TLS,
        certificate and host name checked); default ``redis://localhost:6379/0``. A
        Redis Cluster: ``redis+cluster://[[user]:password@]host[:port][,host[:port]...]``
        (any of its nodes) or ``rediss+cluster://...`` (TLS). A primary found through
        Redis Sentinel (and followed after a failover):
        ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/SERVICE[/db]``
        (the Sentinels, port 26379 by default) or ``rediss+sentinel://...`` (TLS); see
        :func:`tasqueue_anyio._redis.sentinel_kwargs`
    :param client: a coredis client (:class:`coredis.Redis` or
        :class:`coredis.RedisCluster`, not decoding responses) to use instead of a URL;
        the caller opens and closes it
    :param prefix: the start of every key
    :param job_ttl: seconds job state, and group and chain state, is kept after its last
        write (``None``: forever), as a Redis expiry set by the writing script
    :param result_ttl: seconds a saved result is kept after it was written (``None``:
        forever)
    """

    _what = "Redis results store"

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Client | None = None,
        prefix: str = DEFAULT_PREFIX,
        job_ttl: float | None = None,
        result_ttl: float | None = None,
    ) -> None:
        super().__init__(url, client, prefix, _SCRIPTS)
        self.job_ttl = job_ttl
        self.result_ttl = result_ttl
        self._job_ttl = _ttl_ms(job_ttl, "job_ttl")
        self._result_ttl = _ttl_ms(result_ttl, "result_ttl")
        self._job_ttl_arg = str(self._job_ttl).encode()
        p = self.prefix
        self._state_prefix = f"{p}:s:{{"
        self._result_prefix = f"{p}:r:{{"
        self._listing_keys = [
            f"{p}:{{l}}:success".encode(),
            f"{p}:{{l}}:failed".encode(),
            f"{p}:{{l}}:seq".encode(),
        ]
        # the listings passed to the job scripts: none on a cluster (another slot)
        self._listings = [] if self.cluster else self._listing_keys
        self._schedule_keys = [f"{p}:{{sched}}:data".encode(), f"{p}:{{sched}}:fire".encode()]
        # one hash tag: every worker registry script stays on one slot of a cluster
        self._worker_keys = [f"{p}:{{w}}:workers".encode(), f"{p}:{{w}}:alive".encode()]

    # -- keys -------------------------------------------------------------------------------

    def _state(self, job_id: str) -> str:
        return f"{self._state_prefix}{job_id}}}"

    def _result(self, job_id: str) -> str:
        return f"{self._result_prefix}{job_id}}}"

    def _parent(self, parent_id: str) -> list[str]:
        _check_id(parent_id, "group or chain id")
        p = self.prefix
        return [f"{p}:p:{{{parent_id}}}", f"{p}:pm:{{{parent_id}}}", f"{p}:pc:{{{parent_id}}}"]

    # -- jobs -------------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> JobRecord:
        """The stored state of a job (one ``HMGET``).

        :param job_id: the job id
        :return: the record
        :raises JobNotFoundError: nothing is stored under ``job_id`` (or it expired)
        """
        key = self._state(_check_id(job_id, "job id"))
        with translate_errors("reading job state"):
            fields = await self._cmds.submit(lambda client: client.hmget(key, _FIELDS))
        if fields[0] is None:
            raise JobNotFoundError(f"no job state is stored under id {job_id!r}")
        return _record(list(fields))

    async def set_jobs(self, records: Mapping[str, JobRecord]) -> None:
        """Store the state of many jobs in one script, unconditionally (the listings are
        not touched).

        :param records: records by job id
        """
        refuse_result(records.values(), "set_jobs")
        if not records:
            return
        if self.cluster:
            await self._per_slot("set_jobs", records, "storing job state")
            return
        with translate_errors("storing job state"):
            await self._cmds.script("set_jobs", *self._jobs_call(records))

    def _jobs_call(self, records: Mapping[str, JobRecord]) -> tuple[list[str], list[Any]]:
        keys = []
        args: list[Any] = [self._job_ttl_arg]
        for job_id, record in records.items():
            keys.append(self._state(_check_id(job_id, "job id")))
            args += (
                record.status,
                record.data,
                b"1" if record.cancel_requested else b"0",
                record.run,
            )
        return keys, args

    async def create_jobs(self, records: Mapping[str, JobRecord]) -> set[str]:
        """Store the state of the jobs that have none yet, atomically (one script); leave
        the others as they are.

        :param records: records by job id
        :return: the ids whose state this call created
        """
        refuse_result(records.values(), "create_jobs")
        return await self._store_some("create_jobs", records, "creating job state")

    async def _store_some(
        self, script: str, records: Mapping[str, JobRecord], what: str, *, skipped: bool = False
    ) -> set[str]:
        """Run ``script`` (``create_jobs``: it returns the 1-based indexes of the records
        it wrote; ``claim_jobs``, ``skipped``: of those it did not) on ``records``; the
        ids it wrote."""
        if not records:
            return set()
        groups: list[Mapping[str, JobRecord]]
        if self.cluster:
            slots, replies = await self._per_slot(script, records, what)
            groups = list(slots)
        else:
            groups = [records]
            with translate_errors(what):
                replies = [await self._cmds.script(script, *self._jobs_call(records))]
        stored: set[str] = set()
        for group, indexes in zip(groups, replies, strict=True):
            ids = list(group)
            if skipped:
                stored.update(ids)
                stored.difference_update(ids[index - 1] for index in indexes)
            else:
                stored.update(ids[index - 1] for index in indexes)
        return stored

    async def claim_jobs(self, records: Mapping[str, JobRecord]) -> set[str]:
        """Store the state of the jobs whose id is free (no state, or ended and its hold
        passed: :meth:`~tasqueue_anyio.abc.Results.claim_jobs`), atomically in one script
        (Redis Cluster: one per slot, pipelined); leave the others as they are.

        :param records: records by job id
        :return: the ids stored
        """
        refuse_result(records.values(), "claim_jobs")
        return await self._store_some("claim_jobs", records, "storing job state", skipped=True)

    async def _per_slot(
        self, script: str, records: Mapping[str, JobRecord], what: str
    ) -> tuple[list[dict[str, JobRecord]], list[Any]]:
        """Redis Cluster: run ``script`` (``set_jobs``, ``create_jobs``, ``claim_jobs``) once per slot
        among the jobs' state keys, pipelined; return the groups and their replies."""
        by_slot: dict[int, dict[str, JobRecord]] = {}
        for job_id, record in records.items():
            slot = Key(self._state(_check_id(job_id, "job id"))).slot
            by_slot.setdefault(slot, {})[job_id] = record
        groups = list(by_slot.values())
        sha = self._cmds.shas[script]
        calls = [self._jobs_call(group) for group in groups]
        with translate_errors(what):
            replies = await self._cmds.gather([_evalsha(sha, *call) for call in calls])
            _raise_first(replies)
        return groups, replies

    async def start_job(self, job_id: str, record: JobRecord) -> JobRecord | None:
        """Move a job to ``record`` if it may start (one script; the rule is
        :func:`~tasqueue_anyio.abc.may_start`).

        :param job_id: the job id
        :param record: the new state
        :return: ``None`` when ``record`` was written, else the current (unchanged) record
        """
        refuse_result((record,), "start_job")
        keys = [self._state(_check_id(job_id, "job id")), *self._listings]
        args = (
            job_id,
            record.status,
            record.data,
            b"1" if record.cancel_requested else b"0",
            self._job_ttl_arg,
            record.run,
        )
        with translate_errors("starting a job"):
            reply = await self._cmds.script("start", keys, args)
            if reply == 0 and self.cluster:
                await self._list(job_id, record.status)
        return None if reply == 0 else _record(reply)

    async def update_job(
        self, job_id: str, record: JobRecord, *, expect: Collection[str], run: str | None = None
    ) -> bool:
        """Write ``record`` if the job's status is one of ``expect`` (one script, which
        also lists a ``successful`` or ``failed`` job). ``cancel_requested`` is kept as
        stored.

        :param job_id: the job id
        :param record: the new state
        :param expect: the statuses the job may currently have
        :param run: if given, the run token the job must still have
        :return: whether ``record`` was written (never when the job has no state)
        """
        if not expect:
            return False
        _check_id(job_id, "job id")
        keys = [self._state(job_id), self._result(job_id), *self._listings]
        args = self._update_args(job_id, record, expect, run)
        with translate_errors("updating a job"):
            written = bool(await self._cmds.script("update", keys, args))
            if written and self.cluster:
                await self._list(job_id, record.status)
        return written

    def _update_args(
        self, job_id: str, record: JobRecord, expect: Collection[str], run: str | None
    ) -> list[Any]:
        """ARGV of the update script (see ``_LUA_UPDATE``)."""
        own = record.ttl is not None and record.status in FINAL_STATUSES
        ttl_ms = max(1, int(record.ttl * 1000)) if own and record.ttl is not None else 0
        return [
            job_id,
            record.status,
            record.data,
            ttl_ms if own else self._job_ttl_arg,
            "" if run is None else run,
            record.run,
            b"0" if record.result is None else b"1",
            b"" if record.result is None else record.result,
            ttl_ms if own else self._result_ttl,
            int(record.hold_for * 1000) if record.hold_for else 0,
            b"1" if own else b"0",
            *expect,
        ]

    async def _list(self, job_id: str, status: str) -> None:
        """Redis Cluster: the second step of a write of ``status``: list the job."""
        if status in ("successful", "failed"):
            await self._cmds.script("list", self._listing_keys, (job_id, status))

    async def end_job(
        self,
        job_id: str,
        record: JobRecord,
        *,
        expect: Collection[str],
        run: str | None,
        delivery: Delivery,
        announce: Sequence[tuple[str, bytes]] = (),
    ) -> bool:
        """Record the end of a run and ack its delivery: with a :class:`~tasqueue_anyio.brokers.redis.RedisBroker`'s
        delivery on the same server (the same client, or URLs naming the same server,
        port, db and user; not Redis Cluster), in one script, so no crash can come
        between the record and the ack; otherwise :meth:`update_job` then the ack. As
        in the two-step form, each of the two is conditional on its own fencing (the
        record on the run token, the ack on the lease) and the announcements are
        published only when both happened.

        :return: whether ``record`` was written
        :raises LeaseLostError: the delivery's lease was lost (its message says whether
            the record was written)
        """
        if not (
            expect
            and isinstance(delivery, RedisDelivery)
            and delivery._fusable(self.client, self.server_id)
        ):
            return await super().end_job(
                job_id, record, expect=expect, run=run, delivery=delivery, announce=announce
            )
        update = self._update_args(job_id, record, expect, run)
        ack_keys, ack_args, pairs = delivery._fused_ack(announce)
        _check_id(job_id, "job id")
        keys = [self._state(job_id), self._result(job_id), *self._listing_keys, *ack_keys]
        args = [len(update), *update, len(pairs) // 2, *pairs, *ack_args]
        with translate_errors("ending a job"):
            reply = int(await self._cmds.script("finish", keys, args))
        delivery._fused_done(bool(reply & 1), bool(reply & 2))
        return bool(reply & 2)

    async def request_cancel(self, job_id: str) -> JobRecord:
        """Ask a job to stop (one script).

        A ``queued`` or ``retrying`` job becomes ``cancelled``; a job in a final status is
        left as it is; any other is marked ``cancel_requested``.

        :param job_id: the job id
        :return: the record as it is after the call
        :raises JobNotFoundError: nothing is stored under ``job_id`` (or it expired)
        """
        keys = [self._state(_check_id(job_id, "job id"))]
        with translate_errors("cancelling a job"):
            reply = await self._cmds.script("cancel", keys, (self._job_ttl_arg,))
        if reply == 0:
            raise JobNotFoundError(f"no job state is stored under id {job_id!r}")
        return _record(reply)

    async def get_result(self, job_id: str) -> bytes:
        """The result a job saved.

        :param job_id: the job id
        :return: the saved bytes
        :raises ResultNotFoundError: the job saved no result (or it expired)
        """
        key = self._result(_check_id(job_id, "job id"))
        with translate_errors("reading a result"):
            data = await self._cmds.submit(lambda client: client.get(key))
        if data is None:
            raise ResultNotFoundError(f"no result is stored for job id {job_id!r}")
        return bytes(data)

    async def set_result(self, job_id: str, data: bytes, *, run: str | None = None) -> bool:
        """Store (replace) the result of a job, with ``result_ttl`` if set.

        :param job_id: the job id
        :param data: the result
        :param run: if given, store only while the job is ``processing`` under this run
            (one script: the state and the result share a cluster slot)
        :return: whether it was stored
        """
        key = self._result(_check_id(job_id, "job id"))
        ttl = self._result_ttl or None
        if run is not None:
            keys = [self._state(job_id), key]
            args = (data, ttl or 0, run)
            with translate_errors("storing a result"):
                return bool(await self._cmds.script("set_result", keys, args))
        with translate_errors("storing a result"):
            await self._cmds.submit(lambda client: client.set(key, data, px=ttl))
        return True

    async def set_progress(self, job_id: str, data: bytes, *, run: str) -> bool:
        """Store a running job's progress (field ``p`` of its state; one script).

        :param job_id: the job id
        :param data: the progress (at most :data:`~tasqueue_anyio.abc.MAX_PROGRESS_SIZE`)
        :param run: store only while the job is ``processing`` under this run
        :return: whether it was stored
        """
        check_progress(data)
        keys = [self._state(_check_id(job_id, "job id"))]
        with translate_errors("storing progress"):
            return bool(await self._cmds.script("set_progress", keys, (data, run)))

    async def count_ended(self) -> ResultCounts:
        """The lengths of the success and failed listings: two ``ZCARD``, pipelined (one
        round trip). With a ``job_ttl``, a listing keeps the ids of jobs whose state
        expired until it is next read (``get_success``/``get_failed`` drop them), and the
        count includes them until then.
        """
        success, failed = self._listing_keys[:2]
        calls = [_zcard(success), _zcard(failed)]
        with translate_errors("counting the listings"):
            replies = await self._cmds.gather(calls)
            _raise_first(replies)
        return ResultCounts(successful=int(replies[0]), failed=int(replies[1]))

    async def delete_job(self, job_id: str) -> None:
        """Forget a job: its state, its result and its place in the listings (one script).

        :param job_id: the job id; an unknown one is ignored
        """
        _check_id(job_id, "job id")
        keys = [self._state(job_id), self._result(job_id), *self._listing_keys[:2]]
        if self.cluster:
            calls: list[Callable[[Any], Any]] = [
                _evalsha(self._cmds.shas["delete"], keys[:2], (job_id,)),
                *(_zrem(key, job_id) for key in self._listing_keys[:2]),
            ]
            with translate_errors("deleting a job"):
                _raise_first(await self._cmds.gather(calls))
            return
        with translate_errors("deleting a job"):
            await self._cmds.script("delete", keys, (job_id,))

    async def _listing(self, key: bytes) -> list[str]:
        if self.cluster:
            return await self._cluster_listing(key)
        with translate_errors("reading a listing"):
            if self._job_ttl:
                ids = await self._cmds.script("listing", [key], (self._state_prefix, "}"))
            else:
                ids = await self._cmds.submit(lambda client: client.zrange(key, 0, -1))
        return [job_id.decode() for job_id in ids]

    async def _cluster_listing(self, key: bytes) -> list[str]:
        """Redis Cluster: the listed ids whose state exists; the others are dropped."""
        with translate_errors("reading a listing"):
            scored = await self._cmds.submit(
                lambda client: client.zrange(key, 0, -1, withscores=True)
            )
            ids = [member.decode() for member, _ in scored]
            found = await self._cmds.gather([_exists(self._state(job_id)) for job_id in ids])
            _raise_first(found)
            gone: list[Any] = []
            out = []
            for job_id, (_, score), exists in zip(ids, scored, found, strict=True):
                if exists:
                    out.append(job_id)
                else:
                    gone += (job_id, repr(float(score)))
            if gone:
                await self._cmds.script("unlist_gone", [key], gone)
        return out

    async def get_success(self) -> list[str]:
        """Ids of jobs that ended ``successful``, in the order they ended.

        :return: the ids, each once
        """
        return await self._listing(self._listing_keys[0])

    async def get_failed(self) -> list[str]:
        """Ids of jobs that ended ``failed``, in the order they ended.

        :return: the ids, each once
        """
        return await self._listing(self._listing_keys[1])

    # -- groups and chains ("parents") ---------------------------------------------------

    async def set_parent(self, parent_id: str, record: ParentRecord) -> None:
        """Store (replace) the state of a group or chain, its member counts rebuilt
        (one script).

        :param parent_id: the group or chain id
        :param record: the new state
        """
        keys = self._parent(parent_id)
        has_error = record.error is not None
        args: list[Any] = [
            self._job_ttl_arg,
            record.kind,
            record.status,
            record.data,
            b"1" if has_error else b"0",
            record.error if has_error else b"",
        ]
        for member, status in record.members.items():
            args += (member, status)
        with translate_errors("storing a group or chain"):
            await self._cmds.script("set_parent", keys, args)

    async def get_parent(self, parent_id: str) -> ParentRecord:
        """The stored state of a group or chain (one script: a consistent snapshot).

        :param parent_id: the group or chain id
        :return: the record
        :raises NotFoundError: nothing is stored under ``parent_id`` (or it expired)
        """
        keys = self._parent(parent_id)[:2]
        with translate_errors("reading a group or chain"):
            reply = await self._cmds.script("get_parent", keys, ())
        if reply == 0:
            raise NotFoundError(f"no group or chain is stored under id {parent_id!r}")
        (kind, status, data, error), flat = reply
        return ParentRecord(
            kind=kind.decode(),
            status=status.decode(),
            data=data or b"",
            members={flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)},
            error=None if error is None else error.decode(),
        )

    async def set_member_status(self, parent_id: str, job_id: str, status: str) -> dict[str, int]:
        """Record a member's status; return how many members are in each status (one
        script, counters kept in a hash).

        :param parent_id: the group or chain id
        :param job_id: the member job id
        :param status: the member's new status
        :return: status → number of members, without zero counts
        :raises NotFoundError: nothing is stored under ``parent_id`` (or it expired)
        """
        keys = self._parent(parent_id)
        with translate_errors("recording a member's status"):
            reply = await self._cmds.script(
                "set_member", keys, (self._job_ttl_arg, _check_id(job_id, "job id"), status)
            )
        if reply == 0:
            raise NotFoundError(f"no group or chain is stored under id {parent_id!r}")
        return _counts(reply)

    async def set_parent_status(
        self, parent_id: str, status: str, *, expect: Collection[str], error: str | None = None
    ) -> bool:
        """Set the parent's status (and ``error``, if given) if its status is in ``expect``
        (one script).

        :param parent_id: the group or chain id
        :param status: the new status
        :param expect: the statuses the parent may currently have
        :param error: the new error; ``None`` keeps the stored one
        :return: whether it was written (never when nothing is stored or it expired)
        """
        if not expect:
            return False
        keys = self._parent(parent_id)
        args = [
            self._job_ttl_arg,
            status,
            b"0" if error is None else b"1",
            b"" if error is None else error,
            *expect,
        ]
        with translate_errors("setting a group's or chain's status"):
            return bool(await self._cmds.script("set_parent_status", keys, args))

    # -- cron schedules --------------------------------------------------------------------

    async def set_schedule(self, record: ScheduleRecord) -> None:
        """Store (replace) a schedule (its fire time as ``repr(float)``).

        :param record: the schedule
        """
        args = (_check_id(record.id, "schedule id"), record.data, repr(float(record.next_fire)))
        with translate_errors("storing a schedule"):
            await self._cmds.script("set_schedule", self._schedule_keys, args)

    async def get_schedules(self) -> list[ScheduleRecord]:
        """Every stored schedule, ordered by id (code point order).

        :return: the schedules
        """
        with translate_errors("reading schedules"):
            datas, fires = await self._cmds.script("get_schedules", self._schedule_keys, ())
        fire_by_id = {fires[i]: fires[i + 1] for i in range(0, len(fires), 2)}
        records = []
        for i in range(0, len(datas), 2):
            fire = fire_by_id.get(datas[i])
            if fire is None:
                continue
            records.append(
                ScheduleRecord(id=datas[i].decode(), data=datas[i + 1], next_fire=float(fire))
            )
        records.sort(key=lambda record: record.id)
        return records

    async def advance_schedule(
        self, schedule_id: str, expect_fire: float, next_fire: float
    ) -> bool:
        """Move a schedule's ``next_fire`` from ``expect_fire`` to ``next_fire`` (one
        script comparing the stored ``repr`` exactly).

        :param schedule_id: the schedule id
        :param expect_fire: the ``next_fire`` the schedule must have now
        :param next_fire: the new ``next_fire``
        :return: whether it was moved
        """
        args = (
            _check_id(schedule_id, "schedule id"),
            repr(float(expect_fire)),
            repr(float(next_fire)),
        )
        with translate_errors("advancing a schedule"):
            return bool(await self._cmds.script("advance", self._schedule_keys, args))

    async def delete_schedule(self, schedule_id: str) -> bool:
        """Remove a schedule.

        :param schedule_id: the schedule id
        :return: whether it existed
        """
        args = (_check_id(schedule_id, "schedule id"),)
        with translate_errors("deleting a schedule"):
            return bool(await self._cmds.script("delete_schedule", self._schedule_keys, args))

    # -- the worker registry (heartbeats) --------------------------------------------------

    async def put_worker(self, record: WorkerRecord, ttl: float) -> None:
        """Store (replace) a worker's record; it expires ``ttl`` seconds after this put,
        by the Redis clock (one script, which also drops the records that expired).

        :param record: the record
        :param ttl: seconds (over 0, at most a day)
        """
        ttl_ms = max(1, round(check_worker_ttl(ttl) * 1000))
        args = (_check_id(record.id, "worker id"), record.encode(), str(ttl_ms))
        with translate_errors("storing a worker's record"):
            await self._cmds.script("put_worker", self._worker_keys, args)

    async def get_workers(self) -> list[WorkerRecord]:
        """The live workers' records, ordered by ``started_at``, then id (one script: it
        drops the expired ones, then reads the others).

        :return: the records; one that does not decode is left out (logged)
        """
        with translate_errors("reading the workers"):
            reply = await self._cmds.script("get_workers", self._worker_keys, ())
        records = []
        for raw in reply:
            try:
                records.append(WorkerRecord.decode(bytes(raw)))
            except DecodeError as exc:
                _log.warning("%r: left out an unreadable worker record: %s", self, exc)
        records.sort(key=lambda record: (record.started_at, record.id))
        return records

    async def remove_worker(self, worker_id: str) -> None:
        """Remove a worker's record (an unknown id is ignored).

        :param worker_id: the worker id
        """
        args = (_check_id(worker_id, "worker id"),)
        with translate_errors("removing a worker's record"):
            await self._cmds.script("remove_worker", self._worker_keys, args)
