"""The Redis broker, on coredis: at-least-once delivery with leases and fencing.

Needs Redis 6.2 or later (``LPOP`` with a count). Runs on Trio and asyncio (coredis is
AnyIO-native).

Keys
----
Every key starts with the prefix (default ``tasqueue``). The keys of queue ``Q`` share
the hash tag ``{q:Q}``, so every script of a queue touches one Redis Cluster slot::

    P:{q:Q}:ready    list    ids of due messages of priority 0, oldest first (RPUSH, LPOP)
    P:{q:Q}:prio     zset    ids of due messages of priority 1-9, by (10 - priority) * 2**40
                             + enqueue sequence (ZPOPMIN: higher priority first, FIFO within)
    P:{q:Q}:msg      hash    id -> message bytes (the message exists while this does)
    P:{q:Q}:att      hash    id -> deliveries so far; '~p' id -> its prio score (priority > 0)
    P:{q:Q}:sched    zset    id scored by ETA (POSIX seconds)
    P:{q:Q}:lease    zset    id of a held message scored by its lease expiry (ms, Redis clock)
    P:{q:Q}:held     hash    id of a held message -> its delivery's fencing token
    P:{q:Q}:seq      string  the queue's fencing-token counter
    P:{q:Q}:notify   channel pub/sub channel (not a key) that wakes idle consumers
    P:{q:Q}:dead     list    dead letters, msgpack ``[data, reason, at]``

Queue names are validated (letters, digits, ``_``, ``-``) before they become keys; message
ids are hash fields and set members, never part of a key. Pub/sub channels are
``P:ch:NAME``.

Redis Cluster
-------------
Every script touches the keys of one queue only, so of one slot, and different queues
spread over the masters. Two calls span queues: ``enqueue_many`` and an ``ack`` that
enqueues follow-ups. With ``split_slots`` (the default for a cluster client) they become
one script per queue, pipelined: each queue's messages are stored all or none, and an
``ack`` enqueues the other queues' messages first, so a crash in between repeats them
(deduplicated by message id) rather than losing them. Notifications and channels use
classic ``PUBLISH``, which the cluster broadcasts to every node; the broker's subscriber
connection may be on any node. The cluster keeps the order of the messages published
through one node only, so :meth:`RedisBroker.publish` sends every message of a channel
through the node of the channel name's slot (a script given the name as its key).

Partitions
----------
``partitions={"Q": N}`` spreads queue ``Q`` over ``N`` hash tags, so over a cluster's
masters: partition 0 keeps the keys above (tag ``{q:Q}``: one partition is an
unpartitioned queue), partition ``i`` has the same keys under the tag ``{q:Q:i}`` (a
queue name has no ``:``, so no other queue's tag looks like it). A message goes to
partition ``crc32(id) % N`` (:func:`partition_of`), so an id enqueued again lands where
its first copy is and is deduplicated there. Every script still runs on one partition;
``enqueue_many`` and acks with follow-ups group by partition as they group by queue. A
consumer fetches from the partitions one after the other, each round starting at the next
one, until its batch is full (one fetch per round when the first has enough; an
unpartitioned queue makes exactly one), and subscribes to every partition's ``notify``.
FIFO and priorities hold within a partition. Counts, listings, purge and dead letters
cover every partition (one script each, one pipeline), merged; limits (``lwin``,
``lrun``) stay under partition 0's tag. ``drain_partitions`` makes consumers and
inspection read partitions beyond ``partitions`` (after lowering the number) without
enqueueing there.

Delivery
--------
One Lua script (``fetch``) returns messages whose lease expired to the front of the
ready list, moves *every* due scheduled message to the back of it in ETA order (a message
of priority > 0 goes back to ``prio`` under its first score instead), then pops up to N
ids, from ``prio`` first and then from the ready list, and leases them: each gets ``attempt`` (its delivery count) and a fresh
fencing *token* from the queue's counter, recorded in ``held``. Ack, nack and
dead-letter are scripts that act only while ``held`` still has the delivery's token; a
worker whose lease was lost (it was paused past the lease, and the message was swept and
delivered again) gets :class:`~tasqueue_anyio.BrokerError` and changes nothing.

A broker renews the leases of every message it holds (handed to a worker or fetched and
not handed over yet) every ``lease / 3`` seconds, one script call per queue, all queues
in one pipeline. Every consumer sweeps expired leases on each fetch, and an idle one
wakes at least every ``lease / 3`` seconds to do so. A delivery garbage-collected
unsettled is given back at the next renewal.

An idle consumer waits, without polling, for a notification on the queue's pub/sub
channel (received by the broker's one subscriber connection), at most until the next ETA
or the next sweep. Scripts publish one when a queue's ready list goes from empty to
not empty, when a message becomes the earliest scheduled one, and after a fetch that
left messages behind (so other idle consumers take them). Waiting on pub/sub rather
than in ``BLPOP`` keeps cancellation cheap: coredis drops the connection of a blocking
command that is cancelled, and a cancelled connection attempt leaks its streams
(``ResourceWarning``).

Every call goes through a write-combiner (:class:`tasqueue_anyio._redis.Commands`):
calls made while a round trip is in flight share the next one, as one pipeline.

Clock: lease expiry, ETA due checks and ``nack(delay=...)`` use the Redis server's clock
(``TIME`` inside the scripts), so every consumer agrees; ETAs are POSIX times from the
producer's clock.
"""

from __future__ import annotations

import heapq
import logging
import random
import time
import weakref
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from types import MappingProxyType
from typing import Any

import anyio
import msgpack
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectSendStream
from coredis.exceptions import ConnectionError as RedisConnectionError
from coredis.exceptions import SentinelError
from coredis.patterns.pubsub import BasePubSub
from coredis.retry import CompositeRetryPolicy, ConstantRetryPolicy, ExponentialBackoffRetryPolicy

from .._exceptions import BrokerError, InvalidInputError, LeaseLostError, NotReplicatedError
from .._jobs import check_priority, validate_channel, validate_queue
from .._redis import DEFAULT_PREFIX, Client, RedisBackend, evalsha, translate_errors
from .._retry import RetryBackoff
from ..abc import (
    Broker,
    DeadLetter,
    Delivery,
    Envelope,
    QueueCounts,
    QueueLimits,
    limit_channel,
)

__all__ = ["MAX_PARTITIONS", "RedisBroker", "RedisDelivery", "partition_of"]

logger = logging.getLogger(__name__)

#: The default lease (seconds) of a held message.
DEFAULT_LEASE = 15.0
#: The default and the largest number of messages one fetch takes.
DEFAULT_BATCH_SIZE = 32
_MAX_BATCH_SIZE = 1000
#: The most partitions a queue may have (see ``partitions`` of :class:`RedisBroker`).
MAX_PARTITIONS = 64

# The keys of one queue, in the order every script receives them.
_SUFFIXES = ("ready", "msg", "att", "sched", "lease", "held", "notify", "seq", "dead", "prio")
_NKEYS = len(_SUFFIXES)

# -- Lua ------------------------------------------------------------------------------------
# KEYS come in groups of ten per queue (see _SUFFIXES): with k the group's offset,
# KEYS[k+1] ready, k+2 msg, k+3 att, k+4 sched, k+5 lease, k+6 held, k+7 notify, k+8 seq,
# k+9 dead, k+10 prio.

_LUA_COMMON = r"""
-- End a delivery's hold if its token still matches; false when the lease was lost.
local function release(id, token)
  if redis.call('HGET', KEYS[6], id) ~= token then
    return false
  end
  redis.call('HDEL', KEYS[6], id)
  redis.call('ZREM', KEYS[5], id)
  return true
end

local function clock()
  local t = redis.call('TIME')
  local sec, usec = tonumber(t[1]), tonumber(t[2])
  return sec + usec / 1000000, sec * 1000 + math.floor(usec / 1000)
end

local function push_all(cmd, key, items)
  local n = #items
  local i = 1
  while i <= n do
    local j = math.min(i + 999, n)
    redis.call(cmd, key, unpack(items, i, j))
    i = j + 1
  end
end

-- Put ids with the due messages of queue group 0: those of priority > 0 (their score is
-- in the att hash under '~p' .. id) in the prio zset at their first place, the others at
-- the back of the ready list (at its front with front, keeping their order).
local function make_due(ids, front)
  local plain, urgent = {}, {}
  for i = 1, #ids, 1000 do
    local j = math.min(i + 999, #ids)
    local fields = {}
    for n = i, j do
      fields[#fields + 1] = '~p' .. ids[n]
    end
    local scores = redis.call('HMGET', KEYS[3], unpack(fields))
    for n = i, j do
      local score = scores[n - i + 1]
      if score then
        urgent[#urgent + 1] = score
        urgent[#urgent + 1] = ids[n]
      else
        plain[#plain + 1] = ids[n]
      end
    end
  end
  if #urgent > 0 then
    push_all('ZADD', KEYS[10], urgent)
  end
  if #plain > 0 then
    if front then
      local reversed = {}
      for i = #plain, 1, -1 do
        reversed[#reversed + 1] = plain[i]
      end
      push_all('LPUSH', KEYS[1], reversed)
    else
      push_all('RPUSH', KEYS[1], plain)
    end
  end
end

-- wake idle consumers of the queue (they wait for this on pub/sub)
local function notify(key)
  redis.call('PUBLISH', key, '')
end

-- A message for later; idle consumers wake to shorten their wait if it is the earliest.
local function schedule(key, eta, id, notify_key)
  redis.call('ZADD', key, eta, id)
  if redis.call('ZRANGE', key, 0, 0)[1] == id then
    notify(notify_key)
  end
end

-- Messages as quadruples (queue group index from 0 times 10 plus the priority, id, data,
-- eta or '') from ARGV[abase+1].
local function enqueue(abase, now)
  local ready = {}
  for i = abase + 1, #ARGV, 4 do
    local group_priority = tonumber(ARGV[i])
    local priority = group_priority % 10
    local k = group_priority - priority  -- the group index times 10 keys
    local id = ARGV[i + 1]
    if redis.call('HSETNX', KEYS[k + 2], id, ARGV[i + 2]) == 1 then
      local eta = ARGV[i + 3]
      local score = nil
      if priority > 0 then
        score = string.format(
          '%.17g', (10 - priority) * 1099511627776 + redis.call('INCR', KEYS[k + 8]))
        redis.call('HSET', KEYS[k + 3], '~p' .. id, score)
      end
      if eta ~= '' and tonumber(eta) > now then
        schedule(KEYS[k + 4], eta, id, KEYS[k + 7])
      elseif score then
        redis.call('ZADD', KEYS[k + 10], score, id)
        notify(KEYS[k + 7])
      else
        local list = ready[k]
        if not list then
          list = {}
          ready[k] = list
        end
        list[#list + 1] = id
      end
    end
  end
  for k, list in pairs(ready) do
    local was_empty = redis.call('LLEN', KEYS[k + 1]) == 0
    push_all('RPUSH', KEYS[k + 1], list)
    if was_empty then
      notify(KEYS[k + 7])
    end
  end
end

-- Expired leases back to the front of the ready list, then every due scheduled message
-- to its back in ETA order (queue group 0).
local function refresh(now, now_ms)
  local moved = false
  local expired = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now_ms, 'LIMIT', 0, 1000)
  if #expired > 0 then
    push_all('ZREM', KEYS[5], expired)
    push_all('HDEL', KEYS[6], expired)
    make_due(expired, true)
    moved = true
  end
  local due = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', string.format('%.17g', now))
  if #due > 0 then
    push_all('ZREM', KEYS[4], due)
    make_due(due, false)
    moved = true
  end
  return moved
end
"""

# ARGV: count, lease ms. Returns {ms until the next ETA or -1, {id, data, attempt, token, ...}}.
_LUA_FETCH = r"""
local now, now_ms = clock()
refresh(now, now_ms)
local out = {}
local want = tonumber(ARGV[1])
local ids = false
local urgent = redis.call('ZPOPMIN', KEYS[10], want)
if #urgent > 0 then
  ids = {}
  for i = 1, #urgent, 2 do
    ids[#ids + 1] = urgent[i]
  end
  if #ids < want then
    local rest = redis.call('LPOP', KEYS[1], want - #ids)
    if rest then
      for i = 1, #rest do
        ids[#ids + 1] = rest[i]
      end
    end
  end
else
  ids = redis.call('LPOP', KEYS[1], want)
end
if ids then
  local lease_until = now_ms + tonumber(ARGV[2])
  local token = redis.call('INCRBY', KEYS[8], #ids) - #ids
  local datas = redis.call('HMGET', KEYS[2], unpack(ids))
  local leases, held = {}, {}
  for i = 1, #ids do
    token = token + 1
    local id, data = ids[i], datas[i]
    if not data then
      -- not put there by this library (or its data is gone): deliver the element
      -- itself, so that the worker dead-letters it
      data = id
      id = '~raw:' .. token
      redis.call('HSET', KEYS[2], id, data)
    end
    local attempt = redis.call('HINCRBY', KEYS[3], id, 1)
    leases[#leases + 1] = lease_until
    leases[#leases + 1] = id
    held[#held + 1] = id
    held[#held + 1] = token
    out[#out + 1] = id
    out[#out + 1] = data
    out[#out + 1] = attempt
    out[#out + 1] = token
  end
  redis.call('ZADD', KEYS[5], unpack(leases))
  redis.call('HSET', KEYS[6], unpack(held))
  if redis.call('LLEN', KEYS[1]) > 0 or redis.call('ZCARD', KEYS[10]) > 0 then
    notify(KEYS[7])  -- more to do: wake another consumer
  end
end
local wait = -1
local first = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
if #first > 0 then
  wait = math.max(0, math.ceil((tonumber(first[2]) - now) * 1000))
end
return {wait, out}
"""

# ARGV: quadruples (see enqueue). Returns 1.
_LUA_ENQUEUE = r"""
local now = clock()
enqueue(0, now)
return 1
"""

# ARGV: id, token, n, then n (channel, message) pairs to publish, then quadruples to
# enqueue. Returns 1, or 0 when the lease was lost.
_LUA_ACK = r"""
local id = ARGV[1]
if not release(id, ARGV[2]) then
  return 0
end
redis.call('HDEL', KEYS[2], id)
redis.call('HDEL', KEYS[3], id, '~p' .. id)
local first = 4 + 2 * tonumber(ARGV[3])
if #ARGV >= first then
  local now = clock()
  enqueue(first - 1, now)
end
for i = 4, first - 1, 2 do
  redis.call('PUBLISH', ARGV[i], ARGV[i + 1])
end
return 1
"""

# ARGV: id, token, delay seconds. Returns 1, or 0 when the lease was lost.
_LUA_NACK = r"""
local id = ARGV[1]
if not release(id, ARGV[2]) then
  return 0
end
local delay = tonumber(ARGV[3])
if delay > 0 then
  local now = clock()
  schedule(KEYS[4], string.format('%.17g', now + delay), id, KEYS[7])
else
  make_due({id}, true)
  notify(KEYS[7])
end
return 1
"""

# ARGV: id, token, dead-letter entry. Returns 1, or 0 when the lease was lost.
_LUA_DEAD = r"""
local id = ARGV[1]
if not release(id, ARGV[2]) then
  return 0
end
redis.call('HDEL', KEYS[2], id)
redis.call('HDEL', KEYS[3], id, '~p' .. id)
redis.call('RPUSH', KEYS[9], ARGV[3])
return 1
"""

# Fetched messages never handed to a worker go back to the front, in their order, their
# delivery not counted. ARGV: id, token, id, token, ... Returns how many went back.
_LUA_GIVE_BACK = r"""
local back = {}
for i = #ARGV - 1, 1, -2 do
  local id = ARGV[i]
  if redis.call('HGET', KEYS[6], id) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[6], id)
    redis.call('ZREM', KEYS[5], id)
    redis.call('HINCRBY', KEYS[3], id, -1)
    back[#back + 1] = id
  end
end
if #back > 0 then
  local in_order = {}
  for i = #back, 1, -1 do
    in_order[#in_order + 1] = back[i]
  end
  make_due(in_order, true)
  notify(KEYS[7])
end
return #back
"""

# ARGV: lease ms, id, token, id, token, ... Returns the ids whose lease was lost.
_LUA_RENEW = r"""
local _, now_ms = clock()
local lease_until = now_ms + tonumber(ARGV[1])
local lost = {}
for i = 2, #ARGV, 2 do
  local id = ARGV[i]
  if redis.call('HGET', KEYS[6], id) == ARGV[i + 1] then
    redis.call('ZADD', KEYS[5], 'XX', lease_until, id)
  else
    lost[#lost + 1] = id
  end
end
return lost
"""

# ARGV: 'pending' or 'scheduled'. Returns data (pending) or eta, data pairs (scheduled).
_LUA_INSPECT = r"""
local now, now_ms = clock()
if refresh(now, now_ms) then
  notify(KEYS[7])
end
local out = {}
if ARGV[1] == 'pending' then
  local ids = redis.call('ZRANGE', KEYS[10], 0, -1)
  for _, id in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
    ids[#ids + 1] = id
  end
  for i = 1, #ids, 1000 do
    local chunk = {unpack(ids, i, math.min(i + 999, #ids))}
    local datas = redis.call('HMGET', KEYS[2], unpack(chunk))
    for j = 1, #chunk do
      out[#out + 1] = datas[j] or chunk[j]
    end
  end
else
  local pairs_ = redis.call('ZRANGE', KEYS[4], 0, -1, 'WITHSCORES')
  for i = 1, #pairs_, 2 do
    out[#out + 1] = pairs_[i + 1]
    out[#out + 1] = redis.call('HGET', KEYS[2], pairs_[i]) or ''
  end
end
return out
"""

# The counts of a queue, after the refresh a fetch makes (due scheduled messages and
# expired leases back to the queue): {ready, scheduled, leased, dead}.
_LUA_COUNT = r"""
local now, now_ms = clock()
if refresh(now, now_ms) then
  notify(KEYS[7])
end
return {
  redis.call('LLEN', KEYS[1]) + redis.call('ZCARD', KEYS[10]),
  redis.call('ZCARD', KEYS[4]),
  redis.call('ZCARD', KEYS[5]),
  redis.call('LLEN', KEYS[9]),
}
"""

# Removes the messages no worker holds (due and waiting, after the refresh a fetch
# makes) and returns their data: {due ones' data, {eta, data, eta, data, ...} of the
# waiting ones in ETA order}.
_LUA_PURGE = r"""
local now, now_ms = clock()
refresh(now, now_ms)
local ids = redis.call('ZRANGE', KEYS[10], 0, -1)
for _, id in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  ids[#ids + 1] = id
end
local due = #ids
local etas = {}
local waiting = redis.call('ZRANGE', KEYS[4], 0, -1, 'WITHSCORES')
for i = 1, #waiting, 2 do
  ids[#ids + 1] = waiting[i]
  etas[#etas + 1] = waiting[i + 1]
end
local out, later = {}, {}
for i = 1, #ids, 1000 do
  local chunk = {unpack(ids, i, math.min(i + 999, #ids))}
  local datas = redis.call('HMGET', KEYS[2], unpack(chunk))
  for j = 1, #chunk do
    local n = i + j - 1
    if n <= due then
      out[#out + 1] = datas[j] or ''
    else
      later[#later + 1] = etas[n - due]
      later[#later + 1] = datas[j] or ''
    end
  end
  redis.call('HDEL', KEYS[2], unpack(chunk))
  redis.call('HDEL', KEYS[3], unpack(chunk))
  for j = 1, #chunk do
    chunk[j] = '~p' .. chunk[j]
  end
  redis.call('HDEL', KEYS[3], unpack(chunk))
end
redis.call('DEL', KEYS[1], KEYS[4], KEYS[10])
return {out, later}
"""

# Removes the given dead-letter entries (each once). ARGV: entries. Returns how many.
_LUA_REMOVE_DEAD = r"""
local n = 0
for i = 1, #ARGV do
  n = n + redis.call('LREM', KEYS[9], 1, ARGV[i])
end
return n
"""

# Redis Cluster only: PUBLISH routed by the channel name given as a key, so that every
# message of a channel goes through one node (the cluster keeps each node's order, not
# an order across nodes). ARGV: message.
_LUA_PUBLISH = r"""
return redis.call('PUBLISH', KEYS[1], ARGV[1])
"""

# Queue limits. KEYS: the window (zset of start ids by time, ms), the running slots (zset
# of tokens by lease expiry, ms). ARGV: runs ('' for none), per ms, running ('' for
# none), token, lease ms. Takes a start and a slot, or neither; returns 0 when taken,
# else the ms until one may be free (at least 1; for a slot at most 1000).
_LUA_ACQUIRE = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local runs, per, running = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local token = ARGV[4]
local wait = 0
if runs then
  local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - per, 'LIMIT', 0, 1000)
  if #old > 0 then
    redis.call('ZREM', KEYS[1], unpack(old))
  end
  if redis.call('ZCARD', KEYS[1]) >= runs then
    local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    wait = math.max(1, tonumber(first[2]) + per - now)
  end
end
if running then
  local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1000)
  if #dead > 0 then
    redis.call('ZREM', KEYS[2], unpack(dead))
  end
  if not redis.call('ZSCORE', KEYS[2], token) and redis.call('ZCARD', KEYS[2]) >= running then
    local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    wait = math.max(wait, math.max(1, math.min(1000, tonumber(first[2]) - now)))
  end
end
if wait > 0 then
  return wait
end
if runs then
  redis.call('ZADD', KEYS[1], now, token .. ':' .. now)
  redis.call('PEXPIRE', KEYS[1], per + 1000)
end
if running then
  local lease = tonumber(ARGV[5])
  redis.call('ZADD', KEYS[2], now + lease, token)
  redis.call('PEXPIRE', KEYS[2], lease * 2)
end
return 0
"""

# KEYS: the running slots. ARGV: token. Returns 1 when it held one.
_LUA_RELEASE = r"""
return redis.call('ZREM', KEYS[1], ARGV[1])
"""

# KEYS: the running slots. ARGV: lease ms, tokens... Extends the slots still held.
_LUA_RENEW_PERMITS = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now + lease, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], lease * 2)
return 1
"""

_SCRIPTS = {
    "acquire": _LUA_ACQUIRE,
    "release": _LUA_RELEASE,
    "renew_permits": _LUA_RENEW_PERMITS,
    "publish": _LUA_PUBLISH,
    "fetch": _LUA_COMMON + _LUA_FETCH,
    "enqueue": _LUA_COMMON + _LUA_ENQUEUE,
    "ack": _LUA_COMMON + _LUA_ACK,
    "nack": _LUA_COMMON + _LUA_NACK,
    "dead": _LUA_COMMON + _LUA_DEAD,
    "give_back": _LUA_COMMON + _LUA_GIVE_BACK,
    "renew": _LUA_COMMON + _LUA_RENEW,
    "inspect": _LUA_COMMON + _LUA_INSPECT,
    "count": _LUA_COMMON + _LUA_COUNT,
    "purge": _LUA_COMMON + _LUA_PURGE,
    "remove_dead": _LUA_REMOVE_DEAD,
}

# -- Python ---------------------------------------------------------------------------------

# States of a RedisDelivery.
_HELD = 0  # handed out (or fetched), not settled
_SETTLED = 1  # acked, nacked or dead-lettered, or its lease was found lost
_WITHDRAWN = 2  # consume() gave it back after a hand-over that may have happened


def partition_of(message_id: str, partitions: int) -> int:
    """The partition (0 to ``partitions - 1``) a message with id ``message_id`` goes to
    on a queue of ``partitions`` partitions: the CRC-32 of the id's UTF-8 bytes modulo
    ``partitions`` (the same in every process and version, so an id enqueued again
    lands where its first copy is, and is deduplicated there).

    :param message_id: the message id (``Envelope.id``)
    :param partitions: the queue's number of partitions
    :return: the partition's index
    """
    if partitions == 1:
        return 0
    return zlib.crc32(message_id.encode("utf-8", "surrogatepass")) % partitions


def _check_partitions(value: object, option: str) -> dict[str, int]:
    """``value`` as a dict of queue name -> number of partitions, checked."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidInputError(
            f"{option} must map queue names to numbers of partitions (e.g. {{'hot': 3}}), "
            f"got {value!r}"
        )
    out: dict[str, int] = {}
    for name, count in value.items():
        validate_queue(name)
        if isinstance(count, bool) or not isinstance(count, int):
            raise InvalidInputError(
                f"{option}[{name!r}] must be an int in [1, {MAX_PARTITIONS}], got {count!r}"
            )
        if not 1 <= count <= MAX_PARTITIONS:
            raise InvalidInputError(
                f"{option}[{name!r}] must be in [1, {MAX_PARTITIONS}], got {count}"
            )
        out[name] = count
    return out


class _Queue:
    """The keys of one partition of a queue and the messages of it this broker holds."""

    __slots__ = ("held", "index", "keys", "name")

    def __init__(self, prefix: str, name: str, index: int = 0) -> None:
        self.name = name
        self.index = index
        # partition 0 keeps the keys of an unpartitioned queue; a queue name has no ':'
        tag = f"q:{name}" if index == 0 else f"q:{name}:{index}"
        base = f"{prefix}:{{{tag}}}:"
        self.keys: list[bytes] = [(base + suffix).encode() for suffix in _SUFFIXES]
        #: id -> fencing token of every message of this partition held by this broker
        self.held: dict[bytes, bytes] = {}

    def where(self) -> str:
        """The queue's name, with the partition's index if not 0 (for messages)."""
        return repr(self.name) if self.index == 0 else f"{self.name!r} (partition {self.index})"


class _Partitions:
    """The partitions of one queue: enqueues write to the first ``n``; consumers and
    inspection read ``all`` (more than ``n`` while draining a former larger number)."""

    __slots__ = ("all", "n")

    def __init__(self, prefix: str, name: str, n: int, read: int) -> None:
        self.all = tuple(_Queue(prefix, name, i) for i in range(max(n, read)))
        self.n = n

    def pick(self, message_id: str) -> _Queue:
        """The partition of a message id."""
        return self.all[partition_of(message_id, self.n)]


#: The subscriber connection's reconnection: coredis's default (a lost connection is
#: retried for ever, backing off from 0.1 s), also on Sentinel's errors (no primary
#: known yet, or a node that is no longer the primary: a failover going on), backing
#: off to at most 2 s (coredis: 16 s), so notifications come back soon after a restart
#: or a failover.
_PUBSUB_RETRY = CompositeRetryPolicy(
    ExponentialBackoffRetryPolicy(
        (RedisConnectionError, SentinelError),
        retries=None,
        base_delay=0.1,
        max_delay=2,
        jitter=True,
    ),
    ConstantRetryPolicy((TimeoutError,), retries=2, delay=0.1),
)


def _abandon(
    abandoned: deque[tuple[_Queue, bytes, bytes]], item: tuple[_Queue, bytes, bytes]
) -> None:
    """Finalizer of an unsettled :class:`RedisDelivery` (runs wherever the GC runs)."""
    abandoned.append(item)


def _evalsha(sha: bytes, keys: Sequence[Any], args: Sequence[Any]) -> Callable[[Any], Any]:
    return lambda client: evalsha(client, sha, keys, args)


def _lrange(key: bytes) -> Callable[[Any], Any]:
    return lambda client: client.lrange(key, 0, -1)


def _dead_letter(queue: str, entry: bytes) -> DeadLetter:
    """A dead-letter list entry, decoded (an unreadable one as such)."""
    try:
        data, reason, at, *rest = msgpack.unpackb(entry, raw=False, use_list=True)
        if not isinstance(data, bytes):
            raise TypeError("data is not bytes")
        letter_id = str(rest[0]) if rest else ""
        return DeadLetter(queue=queue, data=data, reason=str(reason), at=float(at), id=letter_id)
    except Exception:
        return DeadLetter(queue=queue, data=bytes(entry), reason="unreadable entry", at=0.0)


class _Waiter:
    """What an idle consumer waits on: set by its queue's notifications."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event: anyio.Event | None = None

    def arm(self) -> anyio.Event:
        event = self.event
        if event is None or event.is_set():
            event = self.event = anyio.Event()
        return event

    def wake(self, _data: bytes) -> None:
        if self.event is not None:
            self.event.set()


class RedisDelivery(Delivery):
    """A message handed out by :meth:`RedisBroker.consume`, held under a lease.

    Settle it with exactly one of :meth:`ack`, :meth:`nack` or :meth:`dead_letter`;
    settling again does nothing. Each settle is one script that acts only while this
    delivery's fencing token is still the one Redis recorded: if the lease was lost
    (the message was swept and delivered again), it raises
    :class:`~tasqueue_anyio.BrokerError` and changes nothing. A delivery that is
    garbage-collected unsettled is given back by the broker's next renewal.
    """

    __slots__ = (
        "__weakref__",
        "_attempt",
        "_broker",
        "_data",
        "_finalizer",
        "_id",
        "_q",
        "_state",
        "_token",
    )

    def __init__(
        self,
        broker: RedisBroker,
        queue: _Queue,
        message_id: bytes,
        data: bytes,
        attempt: int,
        token: bytes,
    ) -> None:
        self._broker = broker
        self._q = queue
        self._id = message_id
        self._data = data
        self._attempt = attempt
        self._token = token
        self._state = _HELD
        queue.held[message_id] = token
        self._finalizer = weakref.finalize(
            self, _abandon, broker._abandoned, (queue, message_id, token)
        )
        self._finalizer.atexit = False

    @property
    def data(self) -> bytes:
        """The message as it was enqueued."""
        return self._data

    @property
    def queue(self) -> str:
        """The queue the message was taken from."""
        return self._q.name

    @property
    def attempt(self) -> int:
        """How many times this message has been delivered, this time included (1 first)."""
        return self._attempt

    @property
    def message_id(self) -> str:
        """The id the message was enqueued with."""
        return self._id.decode(errors="replace")

    def __repr__(self) -> str:
        return (
            f"<RedisDelivery queue={self._q.name!r} id={self.message_id!r} attempt={self._attempt}>"
        )

    def _stop_renewing(self) -> None:
        self._finalizer.detach()
        held = self._q.held
        if held.get(self._id) == self._token:
            del held[self._id]

    def _lost(self, action: str, more: str = "") -> LeaseLostError:
        self._state = _SETTLED
        return LeaseLostError(
            f"lease lost: cannot {action} message {self.message_id!r} of queue "
            f"{self._q.name!r} (attempt {self._attempt}); its lease expired or its "
            f"consumer gave it back, and another delivery of it owns it now{more}"
        )


    def abandon(self) -> None:
        """Give the delivery up unsettled (see :meth:`tasqueue_anyio.abc.Delivery.abandon`):
        its message comes back as if its worker had died."""
        if self._state == _HELD:
            self._state = _SETTLED
            self._finalizer()  # the garbage collector's path: given back, not renewed

    async def ack(
        self,
        *,
        enqueue: Sequence[Envelope] = (),
        announce: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        """Remove the message for good and, in the same script, enqueue ``enqueue`` and
        publish ``announce``.

        Messages for other queues go into the same script on a single Redis server
        (atomic). With ``split_slots`` (Redis Cluster, where they may live on other
        slots) they are enqueued first, then the ack runs: a crash in between repeats the
        enqueue (deduplicated by message id while the first copy exists), never loses it.

        :param enqueue: messages to enqueue with the removal
        :param announce: ``(channel, message)`` pairs published by the same script
        :raises BrokerError: the lease was lost; nothing was removed or enqueued
        """
        if self._state != _HELD:
            if self._state == _WITHDRAWN:
                raise self._lost("ack")
            return
        self._stop_renewing()
        if await self._broker._ack(self._q, self._id, self._token, enqueue, announce):
            self._state = _SETTLED
        else:
            raise self._lost("ack")

    def _fusable(self, client: object, server_id: tuple[Any, ...] | None) -> bool:
        """Whether the ack may run inside a script on another store's ``client``: it is
        the broker's own client, or both were made from URLs naming the same server,
        port, db and user, on a single server (not Redis Cluster), and the message is
        still held."""
        broker = self._broker
        if self._state != _HELD or broker.split_slots or broker.cluster:
            return False
        return client is broker.client or (
            server_id is not None and server_id == broker.server_id
        )

    def _fused_ack(
        self, announce: Sequence[tuple[str, bytes]]
    ) -> tuple[list[bytes], list[Any], list[Any]]:
        """Stop renewing and return the ack's keys, its ARGV (announcing nothing) and the
        announcement ARGV (channel key, message pairs) for a fused script."""
        self._stop_renewing()
        broker = self._broker
        pairs: list[Any] = []
        for channel, message in announce:
            pairs += (broker._channel(channel), message)
        return self._q.keys, [self._id, self._token, 0], pairs

    def _fused_done(self, acked: bool, written: bool) -> None:
        """The fused script ran: settled, or the lease was lost."""
        if not acked:
            outcome = "was recorded" if written else "was not recorded either"
            raise self._lost("ack", f"; this run's end {outcome}")
        self._state = _SETTLED

    async def nack(self, *, delay: float = 0) -> None:
        """Give the message back: to the front of its queue, or after ``delay`` seconds.

        :param delay: seconds before the message may be delivered again (Redis clock)
        :raises BrokerError: the lease was lost; nothing changed
        """
        if self._state != _HELD:
            self._state = _SETTLED  # a withdrawn message is back in its queue already
            return
        self._stop_renewing()
        broker = self._broker
        with translate_errors("giving a message back"):
            done = await broker._cmds.script(
                "nack", self._q.keys, (self._id, self._token, repr(max(0.0, float(delay))))
            )
        if done:
            self._state = _SETTLED
        else:
            raise self._lost("nack")

    async def dead_letter(self, reason: str) -> None:
        """Remove the message and append it, with ``reason`` and the time, to the queue's
        dead letters (one script).

        :param reason: why the message was set aside
        :raises BrokerError: the lease was lost; nothing changed
        """
        if self._state != _HELD:
            if self._state == _WITHDRAWN:
                raise self._lost("dead-letter")
            return
        self._stop_renewing()
        entry = msgpack.packb(
            [self._data, str(reason), time.time(), self._id.decode(errors="replace")],
            use_bin_type=True,
        )
        with translate_errors("dead-lettering a message"):
            done = await self._broker._cmds.script(
                "dead", self._q.keys, (self._id, self._token, entry)
            )
        if done:
            self._state = _SETTLED
        else:
            raise self._lost("dead-letter")


class RedisBroker(RedisBackend, Broker):
    """A :class:`~tasqueue_anyio.abc.Broker` on Redis (6.2 or later), via coredis.

    Open it with ``async with``: it owns its connections (unless given a ``client``) and
    runs its lease renewal and pub/sub reader in a task group of its own. Entering it
    again is counted; share one broker between tasks by entering it in a parent task
    first.

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
        the caller opens and closes it (``async with client:`` around the broker's use)
    :param prefix: the start of every key and channel name
    :param lease: seconds a fetched message stays held without renewal; a live broker
        renews every ``lease / 3`` seconds, so a message comes back about ``lease``
        seconds after its worker died
    :param batch_size: the most messages one fetch takes (a consumer takes at most as
        many as its stream has receivers, so a small worker does not hoard messages)
    :param split_slots: run multi-queue writes as one script per queue (needed on Redis
        Cluster, where queues live on different slots); ``None``: only for cluster clients
    :param partitions: queue name -> number of partitions (1 to :data:`MAX_PARTITIONS`;
        1 for a queue not named): a queue's messages spread over that many hash tags
        (``{q:Q}``, ``{q:Q:1}``, ...), so over the masters of a Redis Cluster, each
        message by its id (:func:`partition_of`). Every producer and consumer of a queue
        must give the same number (docs/redis.md says what changing it does); FIFO and
        priorities hold within a partition
    :param drain_partitions: queue name -> a former, larger number of partitions of the
        queue: consumers and the inspection, count and purge calls also read the
        partitions from ``partitions`` up to this one (enqueues do not write there), so
        that what was left there after the number was lowered is not stranded
    :param wait_replicas: after an enqueue's write, wait (Redis ``WAIT``, on the same
        connection, in the same round trip) until this many replicas have it, at most
        ``wait_timeout`` seconds, before the enqueue returns; raise
        :class:`~tasqueue_anyio.BrokerError` when fewer acknowledged it (the messages
        are stored on the primary: a retry of the same ids stores nothing twice).
        Replication is asynchronous, so without it an enqueue acknowledged just before
        a failover can be lost (docs/redis.md, "Redis Sentinel"). ``0`` (the default):
        no wait. Not on a Redis Cluster client (``WAIT`` names no key to route by)
    :param wait_timeout: seconds ``wait_replicas`` waits at most (0.001 to 3600)
    """

    _what = "Redis broker"

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Client | None = None,
        prefix: str = DEFAULT_PREFIX,
        lease: float = DEFAULT_LEASE,
        batch_size: int = DEFAULT_BATCH_SIZE,
        split_slots: bool | None = None,
        partitions: Mapping[str, int] | None = None,
        drain_partitions: Mapping[str, int] | None = None,
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
    ) -> None:
        super().__init__(url, client, prefix, _SCRIPTS)
        #: queue name -> its number of partitions (a queue not named has 1); read-only
        self.partitions: Mapping[str, int] = MappingProxyType(
            _check_partitions(partitions, "partitions")
        )
        #: queue name -> a former number of partitions still read (see
        #: ``drain_partitions``); read-only
        self.drain_partitions: Mapping[str, int] = MappingProxyType(
            _check_partitions(drain_partitions, "drain_partitions")
        )
        if not isinstance(lease, (int, float)) or not 0.05 <= lease <= 86400:
            raise InvalidInputError(f"lease must be seconds in [0.05, 86400], got {lease!r}")
        if (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, int)
            or not 1 <= batch_size <= _MAX_BATCH_SIZE
        ):
            raise InvalidInputError(
                f"batch_size must be an int in [1, {_MAX_BATCH_SIZE}], got {batch_size!r}"
            )
        self.lease = float(lease)
        self.batch_size = batch_size
        self.split_slots = self.cluster if split_slots is None else bool(split_slots)
        if (
            isinstance(wait_replicas, bool)
            or not isinstance(wait_replicas, int)
            or not 0 <= wait_replicas <= 100
        ):
            raise InvalidInputError(
                f"wait_replicas must be an int from 0 to 100, got {wait_replicas!r}"
            )
        if (
            isinstance(wait_timeout, bool)
            or not isinstance(wait_timeout, (int, float))
            or not 0.001 <= wait_timeout <= 3600
        ):
            raise InvalidInputError(
                f"wait_timeout must be seconds in [0.001, 3600], got {wait_timeout!r}"
            )
        if wait_replicas and self.cluster:
            raise InvalidInputError(
                "wait_replicas is for a single primary (redis://, rediss://, "
                "redis+sentinel://): a Redis Cluster client cannot route WAIT, which names "
                "no key"
            )
        #: replicas an enqueue waits for (``WAIT``); 0: none
        self.wait_replicas = wait_replicas
        #: seconds an enqueue waits for them at most
        self.wait_timeout = float(wait_timeout)
        self._lease_ms = str(max(1, round(self.lease * 1000))).encode()
        self._queues: dict[str, _Partitions] = {}
        self._abandoned: deque[tuple[_Queue, bytes, bytes]] = deque()
        # pub/sub
        self._pubsub: BasePubSub[bytes, Any] | None = None
        self._pubsub_lock: anyio.Lock | None = None
        self._callbacks: dict[bytes, list[Callable[[bytes], None]]] = {}
        self._subscribed: set[bytes] = set()

    # -- lifetime -------------------------------------------------------------------------

    async def _open(self) -> None:
        self._pubsub_lock = anyio.Lock()  # locks belong to one event loop
        await super()._open()

    async def _start(self, tg: TaskGroup) -> None:
        await super()._start(tg)
        tg.start_soon(self._renew_forever, name=f"{self!r} lease renewal")

    def _closing(self) -> None:
        self._pubsub = None
        self._subscribed.clear()

    # -- keys -----------------------------------------------------------------------------

    def _parts(self, name: str) -> _Partitions:
        parts = self._queues.get(name)
        if parts is None:
            validate_queue(name)
            parts = self._queues[name] = _Partitions(
                self.prefix,
                name,
                self.partitions.get(name, 1),
                self.drain_partitions.get(name, 1),
            )
        return parts

    def _target(self, env: Envelope) -> _Queue:
        """The partition ``env`` goes to (its queue name and id checked)."""
        parts = self._queues.get(env.queue) or self._parts(env.queue)
        message_id = env.id
        if not isinstance(message_id, str) or not message_id:
            raise InvalidInputError(f"a message id must be a non-empty str, got {message_id!r}")
        return parts.all[0] if parts.n == 1 else parts.pick(message_id)

    def partition(self, queue: str, message_id: str) -> int:
        """The partition of ``queue`` a message with id ``message_id`` goes to (0 on a
        queue of one partition).

        :param queue: the queue
        :param message_id: the message id
        :return: the partition's index; its keys' hash tag is ``{q:QUEUE}`` for 0,
            ``{q:QUEUE:INDEX}`` for the others
        """
        return self._target(Envelope(queue=queue, data=b"", id=message_id)).index

    def _channel(self, channel: str) -> bytes:
        return f"{self.prefix}:ch:{validate_channel(channel)}".encode()

    # -- enqueue ----------------------------------------------------------------------------

    def _enqueue_call(
        self, messages: Sequence[Envelope], first: _Queue | None = None
    ) -> tuple[list[bytes], list[Any]]:
        """KEYS and the message quadruples of ARGV for the ``enqueue`` Lua function (the
        first of each is the partition's group index times 10 plus the priority)."""
        groups: dict[_Queue, int] = {}
        keys: list[bytes] = []
        if first is not None:
            groups[first] = 0
            keys.extend(first.keys)
        args: list[Any] = []
        for env in messages:
            q = self._target(env)
            index = groups.get(q)
            if index is None:
                index = groups[q] = len(groups)
                keys.extend(q.keys)
            eta = env.eta
            priority = env.priority
            if priority:
                check_priority(priority)
                index_priority = index * 10 + priority
            else:
                index_priority = index * 10
            args += (index_priority, env.id, env.data, "" if eta is None else repr(float(eta)))
        return keys, args

    async def enqueue_many(self, messages: Sequence[Envelope]) -> None:
        """Put messages on their queues in one script (one round trip).

        Messages due now are appended in the given order; the others go to their queue's
        schedule. A message whose id is already stored on its queue (enqueued and not
        yet acked) is not stored twice. With ``split_slots``, one script per queue (per
        partition of a partitioned queue), pipelined: each one's messages are stored
        all or none.

        :param messages: the messages
        :raises InvalidInputError: a queue name or message id is invalid (nothing stored)
        """
        if not messages:
            return
        if self.split_slots:
            by_queue: dict[_Queue, list[Envelope]] = {}
            for env in messages:
                by_queue.setdefault(self._target(env), []).append(env)
            calls = [self._enqueue_call(group) for group in by_queue.values()]
        else:
            calls = [self._enqueue_call(messages)]
        if len(calls) == 1 and not self.wait_replicas:
            keys, args = calls[0]
            with translate_errors("enqueueing"):
                await self._cmds.script("enqueue", keys, args)
            return
        # several scripts (and the WAIT after them) in one pipeline: one round trip
        sha = self._cmds.shas["enqueue"]
        makes = [_evalsha(sha, keys, args) for keys, args in calls]
        if self.wait_replicas:
            makes.append(self._wait)
        with translate_errors("enqueueing"):
            replies = await self._cmds.gather(makes)
        for reply in replies[: len(calls)]:
            if isinstance(reply, Exception):
                raise BrokerError(f"Redis failed while enqueueing: {reply}") from reply
        if self.wait_replicas:
            self._check_replicas(replies[-1])

    def _wait(self, client: Any) -> Any:
        """``WAIT wait_replicas timeout`` (a pipeline sends it on the connection of the
        writes before it)."""
        return client.wait(self.wait_replicas, max(1, round(self.wait_timeout * 1000)))

    def _check_replicas(self, acked: object) -> None:
        if isinstance(acked, Exception):
            raise NotReplicatedError(
                f"the enqueue was stored on the Redis primary, but waiting for "
                f"{self.wait_replicas} replica(s) failed: {acked}",
                acknowledged=0,
                wanted=self.wait_replicas,
            ) from acked
        if not isinstance(acked, int) or acked < self.wait_replicas:
            raise NotReplicatedError(
                f"the enqueue was stored on the Redis primary, but only {acked} of "
                f"{self.wait_replicas} replica(s) acknowledged it within "
                f"{self.wait_timeout:g} s: a failover now could lose it (enqueueing the "
                f"same ids again stores nothing twice)",
                acknowledged=acked if isinstance(acked, int) else 0,
                wanted=self.wait_replicas,
            )

    async def _ack(
        self,
        q: _Queue,
        message_id: bytes,
        token: bytes,
        enqueue: Sequence[Envelope],
        announce: Sequence[tuple[str, bytes]] = (),
    ) -> bool:
        if enqueue and self.split_slots:
            others = [env for env in enqueue if self._target(env) is not q]
            if others:
                await self.enqueue_many(others)
                enqueue = [env for env in enqueue if self._target(env) is q]
        head: list[Any] = [message_id, token, len(announce)]
        for channel, message in announce:
            head += (self._channel(channel), message)
        if enqueue:
            keys, args = self._enqueue_call(enqueue, first=q)
            args[:0] = head
        else:
            keys, args = q.keys, head
        if enqueue and self.wait_replicas:
            sha = self._cmds.shas["ack"]
            with translate_errors("acking a message"):
                acked, replicas = await self._cmds.gather([_evalsha(sha, keys, args), self._wait])
            if isinstance(acked, Exception):
                raise BrokerError(f"Redis failed while acking a message: {acked}") from acked
            try:
                self._check_replicas(replicas)
            except NotReplicatedError as exc:
                # the ack is done: its caller must not take it for a failed one
                logger.warning("after an ack that enqueued follow-ups: %s", exc)
            return bool(acked)
        with translate_errors("acking a message"):
            return bool(await self._cmds.script("ack", keys, args))

    # -- consume ----------------------------------------------------------------------------

    async def consume(self, queue: str, send_stream: MemoryObjectSendStream[Delivery]) -> None:
        """Feed ``queue``'s due messages into ``send_stream`` until cancelled.

        Fetches up to ``min(batch_size, number of receivers)`` messages per round trip,
        hands them over one at a time, and waits for the queue's pub/sub wake-up (no
        polling) while the queue is empty.
        On cancellation (or when every receiver is gone) the messages fetched and not
        handed over go back to the front of the queue, their delivery not counted; the
        one whose hand-over was interrupted goes back too, so a receiver that did get it
        finds its lease lost when it settles. Redis errors are logged and retried with
        a bounded backoff.

        A partitioned queue is fetched from one partition after the other, starting each
        round at the next partition (the first at random), until the round has its
        messages; an idle consumer waits for a wake-up of any partition.

        :param queue: the queue
        :param send_stream: where to hand the deliveries; closed on return
        """
        parts = self._parts(queue)
        self._require_open()
        local: deque[RedisDelivery] = deque()
        waiter = _Waiter()
        with send_stream:
            try:
                async with AsyncExitStack() as stack:
                    for q in parts.all:
                        await stack.enter_async_context(self._listen(q.keys[6], waiter.wake))
                    await self._feed(parts.all, send_stream, local, waiter)
            finally:
                if local:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                        await self._give_back(local)

    async def _feed(
        self,
        parts: Sequence[_Queue],
        send_stream: MemoryObjectSendStream[Delivery],
        local: deque[RedisDelivery],
        waiter: _Waiter,
    ) -> None:
        q = parts[0]
        retry = RetryBackoff(logger, f"consuming queue {q.name!r}", {"queue": q.name})
        start = random.randrange(len(parts))
        while True:
            if not local:
                receivers = send_stream.statistics().open_receive_streams
                want = min(self.batch_size, max(1, receivers))
                event = waiter.arm()  # before the fetch: a notification during it counts
                try:
                    if len(parts) == 1:
                        wait_ms, batch = await self._fetch(q, want)
                        local.extend(batch)
                    else:
                        wait_ms = await self._fetch_round(parts, start, want, local)
                        start = (start + 1) % len(parts)
                except BrokerError as exc:
                    await retry.failed(exc)
                    continue
                retry.succeeded()
                if not local:
                    # until an enqueue notifies, the next ETA, or the next sweep
                    timeout = self.lease / 3
                    if wait_ms >= 0:
                        timeout = min(timeout, wait_ms / 1000)
                    with anyio.move_on_after(timeout):
                        await event.wait()
                    continue
            delivery = local[0]
            try:
                await send_stream.send(delivery)
            except anyio.BrokenResourceError:
                return
            except BaseException:
                delivery._state = _WITHDRAWN
                raise
            local.popleft()
            del delivery

    async def _fetch_round(
        self, parts: Sequence[_Queue], start: int, want: int, local: deque[RedisDelivery]
    ) -> int:
        """Fetch up to ``want`` messages into ``local`` from the partitions, one after the
        other from ``start``, until there are enough; return the ms until the earliest
        ETA of the partitions read (-1: none). A partition that fails is passed over (its
        master may be down: the others go on); the round raises its error only when it
        got no message from the others."""
        wait = -1
        got = 0
        error: BrokerError | None = None
        for i in range(len(parts)):
            q = parts[(start + i) % len(parts)]
            try:
                wait_ms, batch = await self._fetch(q, want - got)
            except BrokerError as exc:
                logger.debug("fetching from queue %s failed: %s", q.where(), exc)
                error = error or exc
                continue
            local.extend(batch)
            got += len(batch)
            if wait_ms >= 0 and (wait < 0 or wait_ms < wait):
                wait = wait_ms
            if got >= want:
                break
        if error is not None and not got:
            raise error
        return wait

    async def _fetch(self, q: _Queue, count: int) -> tuple[int, list[RedisDelivery]]:
        with translate_errors(f"fetching from queue {q.where()}"):
            wait_ms, flat = await self._cmds.script("fetch", q.keys, (count, self._lease_ms))
        deliveries = [
            RedisDelivery(self, q, flat[i], flat[i + 1], flat[i + 2], str(flat[i + 3]).encode())
            for i in range(0, len(flat), 4)
        ]
        return int(wait_ms), deliveries

    async def _give_back(self, deliveries: Sequence[RedisDelivery]) -> None:
        """Give fetched, unsettled deliveries back to the front of their partitions, in
        their order (one script per partition, one round trip)."""
        groups: dict[_Queue, list[bytes]] = {}
        for delivery in deliveries:
            if delivery._state == _SETTLED:
                continue
            delivery._stop_renewing()
            if delivery._state == _HELD:
                delivery._state = _SETTLED
            groups.setdefault(delivery._q, []).extend((delivery._id, delivery._token))
        if not groups:
            return
        sha = self._cmds.shas["give_back"]
        items = list(groups.items())
        try:
            with translate_errors("giving messages back"):
                replies = await self._cmds.gather([_evalsha(sha, q.keys, a) for q, a in items])
        except BrokerError as exc:
            replies = [exc] * len(items)
        for (q, args), reply in zip(items, replies, strict=True):
            if isinstance(reply, Exception):
                logger.error(
                    "could not give %d fetched messages back to queue %s; they come back "
                    "when their lease expires: %s",
                    len(args) // 2,
                    q.where(),
                    reply,
                    extra={"queue": q.name},
                )

    # -- leases -----------------------------------------------------------------------------

    async def _renew_forever(self) -> None:
        interval = self.lease / 3
        while True:
            await anyio.sleep(interval)
            try:
                await self.renew_leases()
            except BrokerError:
                logger.exception("renewing leases failed; trying again in %.2fs", interval)

    async def renew_leases(self) -> None:
        """Renew the lease of every message this broker holds, now (one round trip).

        Runs every ``lease / 3`` seconds by itself; also gives back the messages of
        deliveries that were garbage-collected unsettled.
        """
        abandoned = self._abandoned
        while abandoned:
            q, message_id, token = abandoned.popleft()
            if q.held.get(message_id) == token:
                del q.held[message_id]
            with translate_errors("giving back an abandoned message"):
                await self._cmds.script("nack", q.keys, (message_id, token, "0"))
        sha = self._cmds.shas["renew"]
        calls: list[Callable[[Any], Any]] = []
        queues: list[_Queue] = []
        for parts in self._queues.values():
            for q in parts.all:
                if q.held:
                    args: list[bytes] = [self._lease_ms]
                    for item in q.held.copy().items():
                        args += item
                    calls.append(_evalsha(sha, q.keys, args))
                    queues.append(q)
        if not calls:
            return
        with translate_errors("renewing leases"):
            replies = await self._cmds.gather(calls)
        for q, reply in zip(queues, replies, strict=True):
            if isinstance(reply, Exception):
                logger.error("renewing the leases of queue %s failed: %s", q.where(), reply)
                continue
            for message_id in reply:
                logger.warning(
                    "lost the lease of message %r of queue %s (delivered again elsewhere)",
                    message_id,
                    q.where(),
                    extra={"queue": q.name},
                )
                q.held.pop(message_id, None)

    # -- inspection -------------------------------------------------------------------------

    async def _on_each(
        self, parts: Sequence[_Queue], name: str, args: Sequence[Any], what: str
    ) -> list[Any]:
        """Run script ``name`` with ``args`` on every partition in ``parts`` (one round
        trip, through the write-combiner); return the replies in order.

        :raises BrokerError: a call failed
        """
        sha = self._cmds.shas[name]
        return await self._gather([_evalsha(sha, q.keys, args) for q in parts], what)

    async def _gather(self, makes: Sequence[Callable[[Any], Any]], what: str) -> list[Any]:
        """Run the commands ``makes`` build in one flush; their replies in order.

        :raises BrokerError: a command failed
        """
        with translate_errors(what):
            if len(makes) == 1:
                return [await self._cmds.submit(makes[0])]
            replies = await self._cmds.gather(makes)
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
        return replies

    async def get_pending(self, queue: str) -> list[bytes]:
        """Messages on ``queue`` that are due and not held by a worker, oldest first (of
        a partitioned queue: each partition's, oldest first, one partition after the
        other).

        Moves due scheduled messages and expired leases to the queue first, as a fetch
        would.

        :param queue: the queue
        :return: the messages' data
        """
        parts = self._parts(queue).all
        replies = await self._on_each(parts, "inspect", ("pending",), f"reading queue {queue!r}")
        return [data for reply in replies for data in reply]

    async def get_scheduled(self, queue: str) -> list[tuple[float, bytes]]:
        """Messages on ``queue`` waiting for their ETA, as ``(eta, data)`` in ETA order.

        :param queue: the queue
        :return: ``(eta, data)`` pairs, earliest first (equal ETAs of one partition in
            message id order)
        """
        parts = self._parts(queue).all
        replies = await self._on_each(parts, "inspect", ("scheduled",), f"reading queue {queue!r}")
        lists = [
            [(float(flat[i]), flat[i + 1]) for i in range(0, len(flat), 2)] for flat in replies
        ]
        if len(lists) == 1:
            return lists[0]
        return list(heapq.merge(*lists, key=lambda pair: pair[0]))

    def _limit_keys(self, queue: str) -> list[bytes]:
        """The window and running-slot keys of ``queue``'s limits (its hash tag)."""
        base = f"{self.prefix}:{{q:{validate_queue(queue)}}}:"
        return [(base + "lwin").encode(), (base + "lrun").encode()]

    async def acquire_permit(
        self, queue: str, limits: QueueLimits, token: str, lease: float
    ) -> float:
        """Take a permit to start a job of ``queue`` under ``limits`` (see
        :meth:`~tasqueue_anyio.abc.Broker.acquire_permit`): one script on two sorted
        sets of the queue's hash tag (starts in the window, running slots by lease
        expiry), the Redis clock.

        :return: 0 when taken, else the seconds until one may be free
        """
        args = (
            "" if limits.runs is None else limits.runs,
            max(1, int(limits.per * 1000)),
            "" if limits.running is None else limits.running,
            token,
            max(1, int(lease * 1000)),
        )
        with translate_errors(f"taking a permit of queue {queue!r}"):
            wait = await self._cmds.script("acquire", self._limit_keys(queue), args)
        return int(wait) / 1000

    async def release_permit(self, queue: str, token: str) -> None:
        """Free the running slot ``token`` holds, and announce it."""
        with translate_errors(f"releasing a permit of queue {queue!r}"):
            released = await self._cmds.script("release", self._limit_keys(queue)[1:], (token,))
        if released:
            await self.publish(limit_channel(queue), b"")

    async def renew_permits(self, queue: str, tokens: Collection[str], lease: float) -> None:
        """Extend the leases of the running slots ``tokens`` hold (one script)."""
        if not tokens:
            return
        with translate_errors(f"renewing the permits of queue {queue!r}"):
            await self._cmds.script(
                "renew_permits",
                self._limit_keys(queue)[1:],
                (max(1, int(lease * 1000)), *tokens),
            )

    async def count(self, queue: str) -> QueueCounts:
        """How many messages ``queue`` holds: one script (``LLEN``/``ZCARD`` of the
        queue's keys, after moving due scheduled messages and expired leases back to the
        queue as a fetch would), one round trip whatever the queue's length; of a
        partitioned queue, one script per partition (one round trip), summed.

        :param queue: the queue
        :return: the counts (zeros for an unknown queue)
        """
        counts = await self.partition_counts(queue)
        if len(counts) == 1:
            return counts[0]
        return QueueCounts(
            pending=sum(c.pending for c in counts),
            scheduled=sum(c.scheduled for c in counts),
            in_flight=sum(c.in_flight for c in counts),
            dead=sum(c.dead for c in counts),
        )

    async def partition_counts(self, queue: str) -> list[QueueCounts]:
        """:meth:`count` of each partition of ``queue`` (those of ``drain_partitions``
        included): how evenly the messages spread, and whether a partition to drain is
        empty.

        :param queue: the queue
        :return: the counts, by partition index
        """
        parts = self._parts(queue).all
        replies = await self._on_each(parts, "count", (), f"counting queue {queue!r}")
        return [
            QueueCounts(
                pending=int(ready), scheduled=int(scheduled), in_flight=int(leased), dead=int(dead)
            )
            for ready, scheduled, leased, dead in replies
        ]

    async def get_dead_letters(self, queue: str) -> list[DeadLetter]:
        """Messages of ``queue`` set aside with :meth:`RedisDelivery.dead_letter`.

        :param queue: the queue
        :return: the dead letters, oldest first (a partitioned queue's merged by their
            time)
        """
        return [letter for letter, _, _ in await self._dead_entries(queue)]

    async def _dead_entries(self, queue: str) -> list[tuple[DeadLetter, bytes, _Queue]]:
        parts = self._parts(queue).all
        replies = await self._gather(
            [_lrange(q.keys[8]) for q in parts], f"reading the dead letters of queue {queue!r}"
        )
        lists = []
        for q, entries in zip(parts, replies, strict=True):
            lists.append([(_dead_letter(queue, entry), bytes(entry), q) for entry in entries])
        if len(lists) == 1:
            return lists[0]
        return list(heapq.merge(*lists, key=lambda item: item[0].at))

    async def remove_dead_letters(
        self, queue: str, ids: Collection[str] | None = None
    ) -> list[DeadLetter]:
        """Remove dead letters of ``queue`` (those of ``ids``, or all); return them. Reads
        the dead letters, then removes the chosen entries in one script per partition
        (``LREM`` each: an entry another caller removed meanwhile is not returned).

        :param queue: the queue
        :param ids: the dead letters' ids (``None``: all)
        :return: the removed dead letters, oldest first
        """
        wanted = None if ids is None else set(ids)
        chosen = [
            item
            for item in await self._dead_entries(queue)
            if wanted is None or item[0].id in wanted
        ]
        if not chosen:
            return []
        by_part: dict[_Queue, list[bytes]] = {}
        for _, entry, q in chosen:
            by_part.setdefault(q, []).append(entry)
        sha = self._cmds.shas["remove_dead"]
        replies = await self._gather(
            [_evalsha(sha, q.keys, entries) for q, entries in by_part.items()],
            f"removing dead letters of queue {queue!r}",
        )
        if sum(int(reply) for reply in replies) == len(chosen):
            return [letter for letter, _, _ in chosen]
        # another caller removed some meanwhile: return those still there before, gone now
        left = {(entry, q) for _, entry, q in await self._dead_entries(queue)}
        return [letter for letter, entry, q in chosen if (entry, q) not in left]

    async def purge(self, queue: str) -> list[bytes]:
        """Remove the messages of ``queue`` no worker holds (one script per partition,
        one round trip); return their data.

        :param queue: the queue
        :return: the due messages' data (oldest first; of a partitioned queue, one
            partition after the other), then the waiting ones' (ETA order)
        """
        parts = self._parts(queue).all
        replies = await self._on_each(parts, "purge", (), f"purging queue {queue!r}")
        due = [bytes(data) for reply in replies for data in reply[0]]
        waiting = [
            [(float(later[i]), bytes(later[i + 1])) for i in range(0, len(later), 2)]
            for _, later in replies
        ]
        return due + [data for _, data in heapq.merge(*waiting, key=lambda pair: pair[0])]

    # -- pub/sub ----------------------------------------------------------------------------

    async def publish(self, channel: str, data: bytes) -> None:
        """Publish ``data`` on ``channel`` (Redis pub/sub: best effort, no history).

        :param channel: the channel name
        :param data: the message
        """
        key = self._channel(channel)
        with translate_errors("publishing"):
            if self.cluster:
                # coredis sends a PUBLISH to a random node; a script, to the channel's slot
                await self._cmds.script("publish", (key,), (data,))
            else:
                await self._cmds.submit(lambda client: client.publish(key, data))

    @asynccontextmanager
    async def subscribe(
        self, channel: str, callback: Callable[[bytes], None]
    ) -> AsyncIterator[None]:
        """Call ``callback`` with every message published on ``channel`` inside the block.

        The broker has one subscriber connection, whose reader task (in the broker's task
        group) calls the callbacks in publishing order. Entering returns once Redis
        confirmed the subscription, so every message published after that is seen.

        :param channel: the channel name
        :param callback: a quick, non-blocking function of the message
        """
        async with self._listen(self._channel(channel), callback):
            yield

    @asynccontextmanager
    async def _listen(self, key: bytes, callback: Callable[[bytes], None]) -> AsyncIterator[None]:
        """Call ``callback`` with every message on the pub/sub channel ``key`` (raw)."""
        tg = self._require_open()
        lock = self._pubsub_lock
        assert lock is not None
        async with lock:
            if self._pubsub is None:
                await tg.start(self._read_pubsub, name=f"{self!r} pub/sub reader")
            callbacks = self._callbacks.setdefault(key, [])
            callbacks.append(callback)
            try:
                if key not in self._subscribed:
                    assert self._pubsub is not None
                    with translate_errors(f"subscribing to {key!r}"):
                        await self._pubsub.subscribe(key)
                    self._subscribed.add(key)
            except BaseException:
                self._remove_callback(key, callback)
                raise
        try:
            yield
        finally:
            self._remove_callback(key, callback)
            if key not in self._callbacks:
                with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                    async with lock:
                        pubsub = self._pubsub
                        if key not in self._callbacks and key in self._subscribed:
                            self._subscribed.discard(key)
                            if pubsub is not None:
                                try:
                                    await pubsub.unsubscribe(key)
                                except Exception:
                                    logger.debug("unsubscribing from %r failed", key, exc_info=True)

    def _remove_callback(self, key: bytes, callback: Callable[[bytes], None]) -> None:
        callbacks = self._callbacks.get(key)
        if callbacks is None:
            return
        callbacks.remove(callback)
        if not callbacks:
            del self._callbacks[key]

    async def _read_pubsub(self, *, task_status: TaskStatus[None]) -> None:
        async with self.client.pubsub(
            ignore_subscribe_messages=True, retry_policy=_PUBSUB_RETRY
        ) as pubsub:
            self._pubsub = pubsub
            try:
                task_status.started()
                while True:
                    message = await pubsub.get_message()
                    if message is None or message["type"] != "message":
                        continue
                    channel = message["channel"]
                    data = message["data"]
                    assert isinstance(channel, bytes)
                    for callback in tuple(self._callbacks.get(channel, ())):
                        try:
                            callback(data)  # type: ignore[arg-type]
                        except Exception:
                            logger.exception(
                                "subscriber %r of channel %r raised",
                                callback,
                                channel,
                                extra={"channel": channel},
                            )
            finally:
                self._pubsub = None
                self._subscribed.clear()
