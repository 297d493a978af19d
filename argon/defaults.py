"""Every default Argon uses, in one place.

Each name is documented where it is defined; the CLI and the library read them from here.
"""

from __future__ import annotations

HOST = "127.0.0.1"
"""Address servers bind to and clients dial when none is given."""

MANAGER_PORT = 8000
"""Port a manager listens on, and a client dials, when none is given."""

WORKER_PORT = 8001
"""Port a worker listens on when none is given."""

MAX_FRAME = 64 * 1024 * 1024
"""Largest frame (bytes) a connection accepts; a larger one closes that connection."""

RETRIES = 10
"""Times a client re-sends a rejected task before raising ``TaskRejected``."""

RETRY_DELAY = 0.06
"""First delay (seconds) before re-sending a rejected task."""

RETRY_BACKOFF = 1.6
"""Factor each further retry delay grows by (10 retries add up to about ten seconds)."""

RETRY_MAX_DELAY = 3.0
"""Upper bound (seconds) on a single retry delay."""

HEARTBEAT = 1.0
"""Seconds between heartbeats on an idle manager-worker link."""

HEARTBEAT_MISSES = 4
"""Heartbeats a peer may miss before its link is declared dead."""

CONNECT_TIMEOUT = 5.0
"""Seconds allowed for connecting and completing the handshake."""

HANDSHAKE_TIMEOUT = 5.0
"""Seconds a server waits for a new connection to finish its handshake."""

RETRY_JITTER = 0.25
"""Fraction by which each retry delay is varied either way, so clients do not retry in step."""

RECONNECT_DELAY = 0.1
"""First delay (seconds) before a worker or client tries to reach a lost peer again."""

RECONNECT_BACKOFF = 2.0
"""Factor each further reconnection delay grows by."""

RECONNECT_MAX_DELAY = 2.0
"""Upper bound (seconds) between a worker's or client's reconnection attempts."""

BACKOFF_JITTER = 0.2
"""Fraction by which each reconnection delay is varied either way (0.2: 80% to 120%)."""

POOL_START_DELAY = 0.1
"""First delay (seconds) before trying again to start a pool process that failed to start."""

POOL_START_BACKOFF = 2.0
"""Factor each further pool-process start delay grows by."""

POOL_START_MAX_DELAY = 5.0
"""Upper bound (seconds) between attempts to start a pool process."""

POOL_START_ATTEMPTS = 8
"""Retries to start a pool process before the worker reports its pool broken and stops."""

RECONNECT_DEADLINE = 30.0
"""Seconds a client waits for a lost connection to come back before failing its tasks."""

MAX_ATTEMPTS = 3
"""Times a task is sent to a worker before a lost worker fails it with ``WorkerLost``."""

MAX_RESENDS = 5
"""Times a client re-sends a task after losing its connection before failing it."""

GRACE = 30.0
"""Seconds a stopping worker or manager waits for running tasks before exiting anyway."""

DRAIN_ACK_TIMEOUT = 2.0
"""Seconds a draining worker, once idle, waits for its manager to confirm it routes it nothing
more (it hands back any task that crossed its goodbye)."""

STATUS_TIMEOUT = 10.0
"""Seconds a client waits for a status reply."""

MAX_DASHBOARDS = 16
"""Most other managers' dashboard addresses a worker reports to a manager (and a manager accepts)."""

FUNCTION_CACHE = 256
"""Deserialized functions a pool process keeps, keyed by their serialized bytes."""

MAX_ITEMS = 100_000
"""Most elements an array or map in one message may hold (a guard against memory bombs)."""

OUTBOX_HIGH = 8 * 1024 * 1024
"""Bytes queued to a peer above which a server stops reading from it until they drain."""

OUTBOX_LOW = 2 * 1024 * 1024
"""Bytes queued to a peer below which a server reads from it again."""

MIN_HEARTBEAT = 0.05
"""Shortest heartbeat interval accepted, from the command line or from a peer's hello."""

MIN_FRAME = 1024
"""Smallest frame limit a peer may announce (a smaller one could not carry a ping)."""

MAX_CAPACITY = 10_000
"""Most pool processes a worker may register with a manager (a guard against absurd claims)."""

WORKER_WAIT = 60.0
"""Seconds a manager keeps tasks queued while no worker is registered, before failing them
with ``NoWorkers``."""

MAX_CONNECTIONS = 1024
"""Connections a server holds open at once; further ones are closed at accept."""

ACCEPT_SLACK = 16
"""Connections a full server still accepts at once, to shed its oldest unfinished handshakes
(or tell the newcomers it is refusing them): descriptors stay below ``max_connections`` plus this."""

LOG_INTERVAL = 10.0
"""Seconds between two log lines about the same repeated event (shed or refused connections)."""

CLIENT_HEARTBEAT_MISSES = 10
"""Heartbeats a client lets its server miss before reconnecting (lenient: a busy client
program may starve its own event loop)."""

CANCEL_TIMEOUT = 5.0
"""Seconds ``Deferred.cancel()`` waits for the server to say whether it dropped the task."""

WAIT_CHECK = 5.0
"""Seconds between a client's checks for tasks that wait unusually long."""

WAIT_WARNING = 10.0
"""Seconds a task may wait at a server before the client checks whether it has workers."""

WAIT_WARNING_EVERY = 60.0
"""Least seconds between two of a client's warnings that its server has no workers."""

BATCH_MESSAGES = 1024
"""Most small messages a connection packs into one batch frame (and accepts in one)."""

BATCH_BYTES = 256 * 1024
"""Largest batch frame a connection builds; bigger messages travel in frames of their own."""

PREFETCH_HORIZON = 0.002
"""Least seconds of work a worker keeps waiting per process, beyond the running task, so its
processes do not idle for a round trip to the manager between short tasks (0: no prefetch).
It keeps twice the round trip it measures, when that is longer."""

PREFETCH_MAX_HORIZON = 0.02
"""Most seconds of work a worker keeps waiting per process, however slow its round trips:
tasks of this length or longer are not prefetched."""

PIPELINE_BYTES = 64 * 1024
"""Largest task (encoded) a worker queues behind a pool process's running task, so the process
starts it without waiting for the worker; larger ones go only to idle processes."""

PIPELINE_DEPTH = 8
"""Most tasks a worker queues behind each pool process's running task (while its tasks are
short). A process that finds its next task already queued need not sleep, and the worker
need not wake it: a 2-process pool alone ran trivial tasks about 1.5x faster with 4 than
with 1, and through a manager 8 used about 14% less CPU per task than 4."""

POLL_BEFORE_SLEEP = 50e-6
"""Seconds a pool process with no task queued keeps looking for its next one (yielding the
CPU to anything runnable) before it sleeps, while its tasks come that close together. On the
2-vCPU test VM waking a sleeping process costs its waker tens of microseconds; polling
first ran trivial tasks through a manager about 1.1x as fast (median of eight alternating
pairs), with no more CPU per task. A process whose last wait lasted four times this or
more sleeps at once; at worst, one whose tasks come 50 to about 200 microseconds apart
polls in vain for up to this long per task."""

MAX_PREFETCH = 64
"""Most tasks a worker holds beyond its processes, however short its tasks are."""

STALL_AFTER = 0.02
"""Seconds after which a worker whose processes are all still on their tasks, each running
far longer than its usual task, hands back the tasks it holds unstarted."""

LINGER = 0.0005
"""Seconds a worker's result may wait for others to share a frame with, while the worker has
tasks waiting for its processes (its manager needs no result urgently to keep it busy)."""

DASHBOARD_INTERVAL = 1.0
"""Seconds between the dashboard's samples of a server's counters (and its page's polls)."""

DASHBOARD_WINDOW = 300.0
"""Seconds of history the dashboard keeps and charts, and over which it takes percentiles."""

DASHBOARD_SAMPLES = 2048
"""Most recent tasks whose wait and run times the dashboard keeps for its percentiles."""

DASHBOARD_DEPARTED = 100
"""Most departed (lost or drained) workers the dashboard remembers."""

DASHBOARD_RATE_SAMPLES = 6
"""Samples (seconds, plus one) over which the dashboard measures each worker's tasks/s."""

DASHBOARD_CONNECTIONS = 64
"""HTTP connections the dashboard serves at once; more wait to be accepted."""

DASHBOARD_MAX_HEADERS = 16 * 1024
"""Largest request headers (bytes) the dashboard reads; larger ones are refused with 431."""
