"""The Celery application of the Celery+Redis baseline (broker and backend from ``BENCH_REDIS_URL``)."""

from __future__ import annotations

import os

from celery import Celery

from bench import tasks

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

app = Celery("argon_bench", broker=URL, backend=URL)
app.conf.update(
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    result_expires=600,
    task_ignore_result=False,
)

noop = app.task(name="bench.noop")(tasks.noop)
echo = app.task(name="bench.echo")(tasks.echo)
