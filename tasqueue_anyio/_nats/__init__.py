"""The project's own AnyIO NATS client (private: used by the NATS broker and results).

No Python NATS client runs on Trio (``nats-py`` is asyncio-only), so this subpackage carries
a small one on AnyIO: :mod:`.protocol` (sans-io parser and encoders), :mod:`.client` (the
connection, subscriptions, request/reply, reconnects) and :mod:`.jetstream` (streams,
consumers, pull fetch, acks, message schedules and the key-value store).

Nothing here is re-exported from :mod:`tasqueue_anyio`; the backends import these modules
directly and translate their errors at the backend boundary.
"""
