"""The joblib backend: Parallel on Argon, automatic batching, abort on error, scikit-learn."""

from __future__ import annotations

import gc
import os
import time

import psutil
import pytest

from argon import Client

joblib = pytest.importorskip("joblib")
argon_joblib = pytest.importorskip("argon.joblib")


def _tasks():
    import time as _time

    def sqr(x):
        return x * x

    def fail_at(x, bad):
        if x == bad:
            raise ValueError(f"bad item {x}")
        _time.sleep(0.01)
        return x

    def getpid_of(x):
        import os as _os

        return x, _os.getpid()

    return sqr, fail_at, getpid_of


sqr, fail_at, getpid_of = _tasks()


@pytest.fixture(scope="module", autouse=True)
def registered() -> None:
    argon_joblib.register()


@pytest.fixture(scope="module")
def address(shared_address: str) -> str:
    return shared_address


@pytest.mark.timeout(120)
def test_parallel_equals_sequential_and_batches(address):
    with Client(address) as client:
        before = client.status()["completed"]
        with joblib.parallel_config(backend="argon", address=address):
            out = joblib.Parallel(n_jobs=-1)(joblib.delayed(sqr)(i) for i in range(10_000))
        tasks = client.status()["completed"] - before
    assert out == [sqr(i) for i in range(10_000)]
    assert tasks < 2_000, f"automatic batching did not engage: {tasks} tasks for 10,000 calls"


@pytest.mark.timeout(60)
def test_n_jobs_means_network_capacity(address):
    with joblib.parallel_config(backend="argon", address=address):
        backend = argon_joblib.ArgonBackend(address)
        assert backend.effective_n_jobs(-1) == 2  # one worker of two processes
        assert backend.effective_n_jobs(-2) == 1
        assert backend.effective_n_jobs(3) == 3
        assert backend.effective_n_jobs(None) == 2  # the default: the whole network
        with pytest.raises(ValueError):
            backend.effective_n_jobs(0)
        backend.client().close()


@pytest.mark.timeout(60)
def test_error_aborts_cleanly_and_the_backend_goes_on(address):
    with joblib.parallel_config(backend="argon", address=address):
        with pytest.raises(ValueError, match="bad item 5"):
            joblib.Parallel(n_jobs=2, batch_size=1)(joblib.delayed(fail_at)(i, 5) for i in range(200))
        assert joblib.Parallel(n_jobs=2)(joblib.delayed(sqr)(i) for i in range(10)) == [i * i for i in range(10)]


@pytest.mark.timeout(180)
def test_scikit_learn_cross_val_score(address):
    sklearn = pytest.importorskip("sklearn")  # noqa: F841 - the extra installs it
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    features, labels = load_iris(return_X_y=True)
    model = LogisticRegression(max_iter=500)
    expected = cross_val_score(model, features, labels, cv=5, n_jobs=1)
    with joblib.parallel_config(backend="argon", address=address):
        scores = cross_val_score(model, features, labels, cv=5, n_jobs=2)
    assert list(scores) == pytest.approx(list(expected))


@pytest.mark.timeout(120)
def test_embedded_network_when_no_address():
    me = psutil.Process()
    before = {c.pid for c in me.children(recursive=True)}
    with joblib.parallel_config(backend="argon", processes=2, retries=3):
        parallel = joblib.Parallel()  # no n_jobs: the whole network, not the calling process
        out = parallel(joblib.delayed(getpid_of)(i) for i in range(50))
        assert len([c for c in me.children(recursive=True) if c.pid not in before]) >= 4
        assert parallel._backend.client().retries == 3  # the client options reach the embedded network's client
        del parallel  # (it holds the backend, whose end stops the network)
    assert [value for value, _ in out] == list(range(50))
    assert os.getpid() not in {pid for _, pid in out}
    deadline = time.monotonic() + 30
    while [c for c in me.children(recursive=True) if c.pid not in before and c.status() != psutil.STATUS_ZOMBIE]:
        assert time.monotonic() < deadline, "the embedded network outlived its backend"
        gc.collect()  # the backend is gone with its config: so is its network
        time.sleep(0.05)
