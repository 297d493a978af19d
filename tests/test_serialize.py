"""Serialization: the function cache, dill fallbacks, exceptions, and the pool's loaded functions."""

from __future__ import annotations

import math
import pickle
import sys
import textwrap

import gevent.subprocess
import pytest

import argon.serialize as serialize
from argon.errors import ArgonError, RemoteError, RemoteTraceback
from argon.serialize import (
    FunctionCache,
    LoadedFunctions,
    dumps,
    dumps_exception,
    dumps_function,
    loads,
    loads_exception,
)

from conftest import child_env

THIS = sys.modules[__name__]

# Globals the functions below capture; tests rebind them with monkeypatch.
SCALE = 3
OFFSET = 10
SETTINGS = {"factor": 2}
ITEMS = [1, 2]
PAIR = (1, [2])

scaled = lambda x: x * SCALE  # noqa: E731 - a module-level lambda travels by value
offset = lambda x: x + OFFSET  # noqa: E731
uses_helper = lambda x: offset(x) * 2  # noqa: E731 - captures another function (and its globals)
uses_settings = lambda x: x * SETTINGS["factor"]  # noqa: E731
uses_items = lambda: sum(ITEMS)  # noqa: E731
uses_pair = lambda: PAIR[1][0]  # noqa: E731
fib_global = lambda n: n if n < 2 else fib_global(n - 1) + fib_global(n - 2)  # noqa: E731


def _make_adder(n):
    def add(x):
        return x + n

    return add


def _make_nested():
    def outer(x):
        def inner(y):
            return math.sqrt(y) * SCALE

        return inner(x) + 1

    return outer


@pytest.fixture
def dill_calls(monkeypatch):
    """Count how often the cache really serializes a function."""
    calls = []
    real = serialize.dumps_function

    def counting(func):
        calls.append(func)
        return real(func)

    monkeypatch.setattr(serialize, "dumps_function", counting)
    return calls


# -- FunctionCache ------------------------------------------------------------------------------


def test_cache_hit_returns_the_identical_bytes(dill_calls):
    cache = FunctionCache()
    first = cache.dumps(scaled)
    assert cache.dumps(scaled) is first
    assert cache.dumps(scaled) is first
    assert len(dill_calls) == 1
    assert loads(first)(2) == 6


def test_cache_hit_for_an_unchanged_closure_and_nested_function(dill_calls):
    cache = FunctionCache()
    add = _make_adder(5)
    nested = _make_nested()
    assert cache.dumps(add) is cache.dumps(add)
    assert cache.dumps(nested) is cache.dumps(nested)
    assert len(dill_calls) == 2


def test_caches_are_independent(dill_calls):
    first, second = FunctionCache(), FunctionCache()
    assert loads(first.dumps(scaled))(1) == loads(second.dumps(scaled))(1) == 3
    assert len(dill_calls) == 2


def test_rebinding_a_captured_global_serializes_afresh(dill_calls, monkeypatch):
    cache = FunctionCache()
    before = cache.dumps(scaled)
    monkeypatch.setattr(THIS, "SCALE", 7)
    after = cache.dumps(scaled)
    assert after is not before
    assert len(dill_calls) == 2
    assert loads(before)(2) == 6
    assert loads(after)(2) == 14
    assert cache.dumps(scaled) is after  # and the new bytes are cached in turn


def test_rebinding_a_global_of_a_captured_function_serializes_afresh(dill_calls, monkeypatch):
    cache = FunctionCache()
    before = cache.dumps(uses_helper)
    assert cache.dumps(uses_helper) is before
    monkeypatch.setattr(THIS, "OFFSET", 100)
    after = cache.dumps(uses_helper)
    assert after is not before
    assert loads(after)(1) == 202


def test_rebinding_a_captured_function_serializes_afresh(monkeypatch):
    cache = FunctionCache()
    before = cache.dumps(uses_helper)
    monkeypatch.setattr(THIS, "offset", lambda x: x - 1)
    after = cache.dumps(uses_helper)
    assert loads(before)(1) == 22
    assert loads(after)(1) == 0


def test_a_closure_over_a_different_value_serializes_afresh(dill_calls):
    cache = FunctionCache()
    add_one, add_two = _make_adder(1), _make_adder(2)
    assert add_one.__code__ is add_two.__code__  # same cache key: only the captured value differs
    one = cache.dumps(add_one)
    two = cache.dumps(add_two)
    assert one != two
    assert loads(one)(10) == 11
    assert loads(two)(10) == 12
    assert len(dill_calls) == 2


def test_a_rebound_closure_cell_serializes_afresh():
    cache = FunctionCache()
    n = 1

    def add(x):
        return x + n

    before = cache.dumps(add)
    n = 5
    assert loads(cache.dumps(add))(10) == 15
    assert loads(before)(10) == 11


def test_changed_defaults_serialize_afresh(dill_calls):
    cache = FunctionCache()

    def power(x, exponent=2, *, plus=0):
        return x**exponent + plus

    before = cache.dumps(power)
    power.__defaults__ = (3,)
    after_defaults = cache.dumps(power)
    power.__kwdefaults__ = {"plus": 1}
    after_kwdefaults = cache.dumps(power)
    assert loads(before)(2) == 4
    assert loads(after_defaults)(2) == 8
    assert loads(after_kwdefaults)(2) == 9
    assert len(dill_calls) == 3


def test_a_function_capturing_a_list_is_never_cached(dill_calls):
    cache = FunctionCache()
    seen = [1]
    snapshot = lambda: list(seen)  # noqa: E731
    before = cache.dumps(snapshot)
    seen.append(2)  # in place: the list's identity does not change
    after = cache.dumps(snapshot)
    assert loads(before)() == [1]
    assert loads(after)() == [1, 2]
    assert len(dill_calls) == 2


def test_a_function_capturing_a_global_dict_is_never_cached(dill_calls, monkeypatch):
    monkeypatch.setattr(THIS, "SETTINGS", {"factor": 2})
    cache = FunctionCache()
    before = cache.dumps(uses_settings)
    SETTINGS["factor"] = 5
    after = cache.dumps(uses_settings)
    assert loads(before)(3) == 6
    assert loads(after)(3) == 15
    assert len(dill_calls) == 2


def test_a_function_capturing_a_global_list_is_never_cached(monkeypatch):
    monkeypatch.setattr(THIS, "ITEMS", [1, 2])
    cache = FunctionCache()
    assert loads(cache.dumps(uses_items))() == 3
    ITEMS.append(10)
    assert loads(cache.dumps(uses_items))() == 13


def test_a_mutable_object_inside_a_tuple_is_never_cached(dill_calls, monkeypatch):
    monkeypatch.setattr(THIS, "PAIR", (1, [2]))
    cache = FunctionCache()
    assert loads(cache.dumps(uses_pair))() == 2
    PAIR[1][0] = 9
    assert loads(cache.dumps(uses_pair))() == 9
    assert len(dill_calls) == 2


def test_a_function_capturing_an_instance_is_never_cached(dill_calls):
    class Box:
        def __init__(self):
            self.value = 1

    box = Box()
    read = lambda: box.value  # noqa: E731
    cache = FunctionCache()
    assert loads(cache.dumps(read))() == 1
    box.value = 2
    assert loads(cache.dumps(read))() == 2
    assert len(dill_calls) == 2


def test_a_function_with_attributes_is_never_cached(dill_calls):
    def tagged():
        return 1

    tagged.tag = "a"
    cache = FunctionCache()
    assert loads(cache.dumps(tagged)).tag == "a"
    tagged.tag = "b"  # its __dict__ travels with it
    assert loads(cache.dumps(tagged)).tag == "b"
    assert len(dill_calls) == 2


def test_a_function_capturing_a_main_class_sees_its_changed_attributes():
    namespace = {"__name__": "__main__"}
    exec("class Settings:\n    scale = 2\n\nf = lambda x: x * Settings.scale\n", namespace)  # a user's script
    cache = FunctionCache()
    assert loads(cache.dumps(namespace["f"]))(1) == 2
    namespace["Settings"].scale = 10
    assert loads(cache.dumps(namespace["f"]))(1) == 10


def test_builtins_and_non_functions_are_serialized_each_time():
    cache = FunctionCache()
    assert loads(cache.dumps(len))([1, 2]) == 2
    assert loads(cache.dumps(math.sqrt))(16) == 4
    assert loads(cache.dumps(str.upper))("a") == "A"


# -- dumps_function and loads ---------------------------------------------------------------------


def test_lambdas_closures_and_nested_functions_round_trip():
    assert loads(dumps_function(lambda x, y=2: x * y))(4) == 8
    assert loads(dumps_function(_make_adder(3)))(4) == 7
    assert loads(dumps_function(_make_nested()))(16) == 13.0
    assert loads(dumps_function(scaled))(5) == 15


def test_a_recursive_nested_function_round_trips():
    def factorial(n):
        return 1 if n <= 1 else n * factorial(n - 1)

    assert loads(dumps_function(factorial))(5) == 120


def test_a_recursive_global_function_round_trips():
    assert loads(dumps_function(fib_global))(10) == 55
    assert loads(FunctionCache().dumps(fib_global))(10) == 55


def test_functions_of_a_module_the_loader_lacks_travel_by_value(tmp_path):
    # Serialize in a process that can import a private module; load where it cannot.
    module = tmp_path / "private_tasks.py"
    module.write_text("FACTOR = 4\nscaled = lambda x: x * FACTOR\ndef make():\n    return lambda x: x - FACTOR\n")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import private_tasks
        from argon.serialize import dumps_function
        print(dumps_function(private_tasks.scaled).hex())
        print(dumps_function(private_tasks.make()).hex())
    """)
    proc = gevent.subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60, env=child_env())
    assert proc.returncode == 0, proc.stderr.decode()
    first, second = proc.stdout.decode().split()
    assert "private_tasks" not in sys.modules
    assert loads(bytes.fromhex(first))(5) == 20
    assert loads(bytes.fromhex(second))(5) == 1


# -- dumps (arguments and results) ----------------------------------------------------------------


def test_dumps_uses_plain_pickle_for_ordinary_values():
    value = {"a": [1, 2.5, "x", b"y", None], "b": (1, 2), "c": {3}}
    assert dumps(value) == pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    assert loads(dumps(value)) == value


def test_dumps_falls_back_to_dill_for_a_lambda():
    square = lambda x: x * x  # noqa: E731
    with pytest.raises((pickle.PicklingError, AttributeError)):
        pickle.dumps(square)
    assert loads(dumps(square))(7) == 49
    assert loads(dumps([square, 2]))[0](3) == 9  # also inside a container


def test_dumps_uses_dill_for_an_object_of_a_main_class(monkeypatch):
    main = sys.modules["__main__"]

    class Point:
        def __init__(self, x):
            self.x = x

        def double(self):
            return self.x * 2

    Point.__module__ = "__main__"
    Point.__qualname__ = "ArgonTestPoint"
    monkeypatch.setattr(main, "ArgonTestPoint", Point, raising=False)
    assert b"__main__" in pickle.dumps(Point(1))  # plain pickle would refer to __main__ by name
    data = dumps(Point(21))
    monkeypatch.delattr(main, "ArgonTestPoint")  # as in a worker, whose __main__ lacks the class
    point = loads(data)
    assert point.x == 21
    assert point.double() == 42


def test_objects_of_a_main_class_load_in_another_interpreter():
    script = textwrap.dedent("""
        import pickle
        from argon.serialize import dumps

        class Point:
            def __init__(self, x):
                self.x = x

            def double(self):
                return self.x * 2

        assert b"__main__" in pickle.dumps(Point(1))  # pickle alone would work here, by reference
        print(dumps(Point(21)).hex())
        print(dumps(lambda p: p.double() + 1).hex())
    """)
    proc = gevent.subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60, env=child_env())
    assert proc.returncode == 0, proc.stderr.decode()
    point, func = proc.stdout.decode().split()
    loader = textwrap.dedent("""
        import sys
        from argon.serialize import loads
        point, func = (loads(bytes.fromhex(arg)) for arg in sys.argv[1:])
        print(func(point))
    """)
    proc = gevent.subprocess.run([sys.executable, "-c", loader, point, func], capture_output=True, timeout=60,
                                 env=child_env())
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().strip() == "43"


# -- exceptions -----------------------------------------------------------------------------------


def _raised(func):
    try:
        func()
    except BaseException as exc:
        return exc
    raise AssertionError("did not raise")


def test_builtin_exception_round_trips_with_the_remote_traceback_as_cause():
    def task_body():
        raise ValueError("bad value 3")

    payload, message, text = dumps_exception(_raised(task_body))
    assert payload is not None
    assert message == "builtins.ValueError: bad value 3"
    assert "task_body" in text and "ValueError: bad value 3" in text
    exc = loads_exception(payload, message, text)
    assert type(exc) is ValueError
    assert exc.args == ("bad value 3",)
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert exc.__cause__.text == text
    assert "task_body" in str(exc.__cause__)


def test_exception_of_a_local_class_round_trips_by_value():
    class Custom(KeyError):
        pass

    def task_body():
        raise Custom("k")

    exc = loads_exception(*dumps_exception(_raised(task_body)))
    assert type(exc).__name__ == "Custom"
    assert isinstance(exc, KeyError)
    assert exc.args == ("k",)


def test_unrebuildable_exception_becomes_remote_error():
    class Strict(Exception):
        def __init__(self, message, code):  # unpickling calls Strict(message) and fails
            super().__init__(message)
            self.code = code

    def task_body():
        raise Strict("cannot be rebuilt", 7)

    payload, message, text = dumps_exception(_raised(task_body))
    assert payload is None
    exc = loads_exception(payload, message, text)
    assert type(exc) is RemoteError
    assert isinstance(exc, ArgonError)
    assert "cannot be rebuilt" in str(exc)
    assert exc.type_name.endswith("Strict")
    assert exc.type_name == message.split(":", 1)[0]
    assert "task_body" in exc.remote_traceback
    assert isinstance(exc.__cause__, RemoteTraceback)


def test_every_error_is_an_argon_error_and_the_standard_one_it_stands_for():
    import concurrent.futures

    import argon

    names = ["TaskRejected", "RemoteError", "ProcessDied", "WorkerLost", "ConnectionLost", "AuthenticationError",
             "ProtocolError", "TaskTimeout", "NoWorkers", "ServerBusy", "ShuttingDown", "TaskCancelled"]
    for name in names:
        assert issubclass(getattr(argon, name), argon.ArgonError), name
    assert issubclass(argon.ServerBusy, argon.ConnectionLost) and issubclass(argon.ShuttingDown, argon.ConnectionLost)
    assert issubclass(argon.TaskTimeout, TimeoutError)
    assert issubclass(argon.TaskCancelled, concurrent.futures.CancelledError)
    assert not issubclass(argon.ServerBusy, argon.AuthenticationError)


def test_unloadable_payload_becomes_remote_error():
    exc = loads_exception(b"not a pickle", "somewhere.Missing: gone", "Traceback ...")
    assert type(exc) is RemoteError
    assert exc.type_name == "somewhere.Missing"
    assert exc.remote_traceback == "Traceback ..."


def test_a_payload_that_is_not_an_exception_becomes_remote_error():
    exc = loads_exception(dumps(42), "mod.Odd: 42", "")
    assert type(exc) is RemoteError
    assert exc.__cause__ is None  # no traceback, no cause


# -- LoadedFunctions ------------------------------------------------------------------------------


@pytest.fixture
def load_calls(monkeypatch):
    calls = []
    real = serialize.loads

    def counting(data):
        calls.append(data)
        return real(data)

    monkeypatch.setattr(serialize, "loads", counting)
    return calls


def test_loaded_functions_hit_returns_the_same_function(load_calls):
    functions = LoadedFunctions(size=4)
    data = dumps_function(lambda x: x + 1)
    first = functions.get(data)
    assert functions.get(data) is first
    assert functions.get(bytes(data)) is first  # keyed by value, not by the bytes object
    assert first(1) == 2
    assert len(load_calls) == 1


def test_loaded_functions_evicts_the_oldest_beyond_its_size(load_calls):
    functions = LoadedFunctions(size=2)
    blobs = [dumps_function(_make_adder(n)) for n in range(3)]
    loaded = [functions.get(blob) for blob in blobs]
    assert [f(0) for f in loaded] == [0, 1, 2]
    assert functions.get(blobs[2]) is loaded[2]
    assert functions.get(blobs[1]) is loaded[1]
    assert len(load_calls) == 3
    reloaded = functions.get(blobs[0])  # the oldest was evicted: deserialized again
    assert reloaded is not loaded[0]
    assert reloaded(0) == 0
    assert len(load_calls) == 4


def test_an_importable_function_is_sent_by_reference_once(dill_calls):
    cache = FunctionCache()
    first = cache.dumps(textwrap.dedent)
    assert cache.dumps(textwrap.dedent) is first  # cached: no check of what it uses, no dill
    assert not dill_calls
    assert b"textwrap" in first and b"dedent" in first and len(first) < 100  # a reference, not code
    assert loads(first) is textwrap.dedent
