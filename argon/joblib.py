"""A joblib backend: ``joblib.Parallel`` (and so scikit-learn's ``n_jobs``) on Argon.

::

    import argon.joblib
    from joblib import Parallel, delayed, parallel_config

    argon.joblib.register()
    with parallel_config(backend="argon", address="mgrhost:8000", key_file="argon.key"):
        print(Parallel(n_jobs=-1)(delayed(pow)(2, i) for i in range(10)))

With ``address=None`` (the default) the backend starts an embedded local network on first
use and keeps it for later ``Parallel`` calls until the backend is discarded (or the
program exits). ``n_jobs=-1`` means the network's capacity (its processes, all workers
together); ``n_jobs=-2`` one fewer, and so on. Tasks are grouped into batches by joblib's
own automatic batching (``batch_size="auto"``): each batch is one Argon task. When a task
fails, joblib aborts the call and the backend drops every batch that has not started.

joblib is an optional dependency: ``pip install 'argon-tasks[joblib]'``.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from joblib import register_parallel_backend
from joblib._parallel_backends import AutoBatchingMixin, ParallelBackendBase

from argon.client import Client
from argon.deferred import Deferred
from argon.executor import start_local_network

NAME = "argon"


def register(name: str = NAME) -> None:
    """Make ``parallel_config(backend="argon", ...)`` (or ``name``) use :class:`ArgonBackend`."""
    register_parallel_backend(name, ArgonBackend)


def call(batch: Any) -> Any:
    """Run one joblib batch in a pool process (the batch travels as the task's argument)."""
    return batch()


class ArgonBackend(AutoBatchingMixin, ParallelBackendBase):  # type: ignore[misc]
    """The joblib backend; its keyword arguments come from ``parallel_config``.

    Args:
        address: The manager(s); None starts an embedded local network.
        key: The shared key, for an ``address``.
        key_file: A key file.
        processes: Processes of the embedded network (default: the CPUs).
        client_options: More :class:`~argon.client.Client` options.
    """

    supports_retrieve_callback = True
    supports_timeout = True
    supports_return_generator = True
    supports_sharedmem = False
    uses_threads = False
    #: ``Parallel()`` without ``n_jobs`` uses the whole network, as joblib's Dask backend does
    #: (with 1, joblib would run every call in the calling process).
    default_n_jobs = -1

    def __init__(
        self,
        address: str | list[str] | None = None,
        *,
        key: bytes | str | None = None,
        key_file: str | None = None,
        processes: int | None = None,
        nesting_level: int | None = None,
        inner_max_num_threads: int | None = None,
        **client_options: Any,
    ) -> None:
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads)
        self.address = address
        self._key = key
        self._key_file = key_file
        self._processes = processes
        self._options = client_options
        self._client: Client | None = None
        self._lock = threading.Lock()
        self._outstanding: set[Deferred] = set()
        self.parallel: Any = None

    def client(self) -> Client:
        """The backend's client, connecting (or starting the embedded network) on first use."""
        with self._lock:
            if self._client is None:
                if self.address is None:
                    cluster, client = start_local_network(
                        self._processes, key_file=self._key_file, client_options=self._options
                    )
                    weakref.finalize(self, _stop, client, cluster)
                else:
                    client = Client(self.address, key=self._key, key_file=self._key_file, **self._options)
                    weakref.finalize(self, client.close)
                self._client = client
            return self._client

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """``n_jobs`` as processes: -1 is the network's capacity, -2 one fewer, and so on.

        Raises:
            ValueError: ``n_jobs`` is 0.
        """
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            n_jobs = self.default_n_jobs
        if n_jobs < 0:
            capacity = int(self.client().status().get("capacity") or 1)
            return max(capacity + 1 + n_jobs, 1)
        return n_jobs

    def configure(self, n_jobs: int = 1, parallel: Any = None, **backend_kwargs: Any) -> int:
        """Connect (or start the embedded network) and return the effective ``n_jobs``."""
        self.client()
        self.parallel = parallel
        return self.effective_n_jobs(n_jobs)

    def submit(self, func: Any, callback: Any = None) -> Deferred:
        """Send one batch as one task; ``callback`` runs when its result is in."""
        future = self.client().submit(call, func)
        with self._lock:
            self._outstanding.add(future)
        future.add_done_callback(self._outstanding.discard)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def retrieve_result_callback(self, out: Deferred) -> Any:
        """The batch's results (or its error)."""
        return out.result()

    def retrieve_result(self, out: Deferred, timeout: float | None = None) -> Any:
        """The batch's results, waiting at most ``timeout`` seconds."""
        return out.result(timeout)

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Drop every batch of this backend that has not started (after a task failed)."""
        with self._lock:
            pending = [f for f in self._outstanding if not f.done()]
        if pending and self._client is not None:
            self._client._cancel(pending, wait=False)
        self.reset_batch_stats()

    def terminate(self) -> None:
        """End of a ``Parallel`` call: forget its statistics (the network stays for the next)."""
        self.reset_batch_stats()


def _stop(client: Client, cluster: Any) -> None:
    client.close()
    cluster.close()
