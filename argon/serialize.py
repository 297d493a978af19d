"""Turning functions, arguments, results and exceptions into bytes and back.

Functions go through dill with ``recurse=True``, so lambdas, closures and functions
defined in ``__main__`` or in a module the worker cannot import carry the globals they
use by value. Functions that live in an importable module travel by reference. dill
costs hundreds of microseconds per call, so :class:`FunctionCache` keeps the bytes of
each function for as long as nothing it captured could have changed.

Arguments, results and exceptions use plain pickle, which is many times faster, and
fall back to dill for what pickle cannot carry (lambdas, objects of classes defined in
``__main__``). Both produce pickle streams, so :func:`loads` reads either.

This is the only module that imports pickle or dill.
"""

from __future__ import annotations

import functools
import pickle
import sys
import traceback
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import dill

from argon import defaults
from argon.errors import RemoteError, RemoteTraceback

_VALUE_TYPES = (
    int,
    float,
    complex,
    str,
    bytes,
    bool,
    type(None),
    range,
    types.ModuleType,
    types.BuiltinFunctionType,
    types.CodeType,
)
_MAIN = b"__main__"


def dumps(obj: Any) -> bytes:
    """Serialize a value with pickle, or dill where pickle cannot (or would refer to ``__main__``)."""
    try:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        return dill.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL, recurse=True)
    if _MAIN in data:
        # pickle refers to __main__ objects by name, which the worker's __main__ lacks.
        return dill.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL, recurse=True)
    return data


def loads(data: bytes) -> Any:
    """Deserialize what :func:`dumps` or :func:`dumps_function` produced."""
    # dill's output is a pickle stream whose helpers live in dill (imported above), so the
    # C unpickler reads both, several times faster than dill's Python subclass.
    return pickle.loads(data)


def dumps_function(func: Callable[..., Any]) -> bytes:
    """Serialize a callable with dill (by value unless it lives in an importable module)."""
    if isinstance(func, types.BuiltinFunctionType):
        return pickle.dumps(func, protocol=pickle.HIGHEST_PROTOCOL)
    try:
        return dill.dumps(func, protocol=pickle.HIGHEST_PROTOCOL, recurse=True)
    except RecursionError:
        if not isinstance(func, types.FunctionType):
            raise
        # dill's recurse mode loops on a closure that refers to itself (a recursive nested
        # function): send a copy whose globals hold only the names it uses instead.
        return dill.dumps(_detached(func), protocol=pickle.HIGHEST_PROTOCOL, recurse=False)


def _detached(func: types.FunctionType) -> types.FunctionType:
    """Copy ``func``, and the nested functions its closure reaches, with minimal globals."""
    copies: dict[int, types.FunctionType] = {}

    def copy(original: types.FunctionType) -> types.FunctionType:
        if id(original) in copies:
            return copies[id(original)]
        namespace = original.__globals__
        globals_used = {name: namespace[name] for name in _names(original.__code__) if name in namespace}
        cells = tuple(types.CellType() for _ in original.__closure__ or ())
        clone = types.FunctionType(
            original.__code__, globals_used, original.__name__, original.__defaults__, cells or None
        )
        clone.__kwdefaults__ = original.__kwdefaults__
        clone.__qualname__ = original.__qualname__
        clone.__module__ = original.__module__
        clone.__doc__ = original.__doc__
        copies[id(original)] = clone
        for cell, old in zip(cells, original.__closure__ or (), strict=True):
            try:
                contents = old.cell_contents
            except ValueError:  # an empty cell stays empty
                continue
            nested = isinstance(contents, types.FunctionType) and "<locals>" in contents.__qualname__
            cell.cell_contents = copy(contents) if nested else contents
        return clone

    return copy(func)


def _stable(value: Any, seen: list[Any], depth: int = 0) -> bool:
    """True if ``value`` cannot change without its identity changing; records what it holds."""
    if isinstance(value, _VALUE_TYPES):
        seen.append(value)
        return True
    if isinstance(value, type):
        # An importable class travels by reference; one from __main__ or a function body
        # travels by value, and its attributes may change: never cache what captures it.
        seen.append(value)
        return value.__module__ != "__main__" and "<locals>" not in value.__qualname__
    if isinstance(value, (tuple, frozenset)) and depth < 4:
        seen.append(value)
        return all(_stable(item, seen, depth + 1) for item in value)
    if isinstance(value, types.FunctionType) and depth < 4:
        seen.append(value)
        return _captures(value, seen, depth + 1)
    return False


@functools.lru_cache(maxsize=1024)
def _names(code: types.CodeType) -> frozenset[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return frozenset(names)


def _captures(func: types.FunctionType, seen: list[Any], depth: int) -> bool:
    """Record everything dill would capture of ``func``; False if any of it is mutable."""
    if func.__dict__:
        return False
    namespace = func.__globals__
    for name in _names(func.__code__):
        if name in namespace and not _stable(namespace[name], seen, depth):
            return False
    for cell in func.__closure__ or ():
        try:
            contents = cell.cell_contents
        except ValueError:  # an empty cell
            contents = None
        if not _stable(contents, seen, depth):
            return False
    for value in (
        func.__defaults__,
        func.__name__,
        func.__qualname__,
        func.__module__,
        *(func.__kwdefaults__ or {}).values(),
    ):
        if not _stable(value, seen, depth):
            return False
    return True


def _importable(func: types.FunctionType) -> bool:
    """Whether ``func`` is what its module's attribute of its name is (so pickled by reference)."""
    module = sys.modules.get(func.__module__)
    if module is None or func.__module__ == "__main__" or "<" in func.__qualname__:
        return False
    found: Any = module
    for part in func.__qualname__.split("."):
        found = getattr(found, part, None)
    return found is func


class FunctionCache:
    """Remembers the serialized form of functions whose captured state cannot have changed.

    The cache is keyed by the function's code object and checked against the identity of
    every global, closure cell and default the function captures: rebinding any of them
    (or a new closure over different values) serializes afresh. Functions that capture a
    mutable object (a list, a dict, an instance) are never cached, since that object could
    change in place.
    """

    def __init__(self) -> None:
        self._entries: weakref.WeakKeyDictionary[types.CodeType, tuple[list[Any], bytes]] = weakref.WeakKeyDictionary()
        self._by_name: weakref.WeakKeyDictionary[types.FunctionType, bytes] = weakref.WeakKeyDictionary()

    def dumps(self, func: Callable[..., Any]) -> bytes:
        """Serialize ``func``, reusing earlier bytes when that is safe."""
        if not isinstance(func, types.FunctionType):
            return dumps_function(func)
        data = self._by_name.get(func)
        if data is not None and _importable(func):
            return data
        if _importable(func):
            # Sent by reference (module and name): its bytes cannot depend on anything it uses.
            data = pickle.dumps(func, protocol=pickle.HIGHEST_PROTOCOL)
            self._by_name[func] = data
            return data
        seen: list[Any] = [func.__globals__]
        if not _captures(func, seen, 0):
            return dumps_function(func)
        entry = self._entries.get(func.__code__)
        if (
            entry is not None
            and len(entry[0]) == len(seen)
            and all(a is b for a, b in zip(entry[0], seen, strict=False))
        ):
            return entry[1]
        data = dumps_function(func)
        self._entries[func.__code__] = (seen, data)
        return data


class LoadedFunctions:
    """A pool process's cache of deserialized functions, keyed by their bytes."""

    def __init__(self, size: int = defaults.FUNCTION_CACHE) -> None:
        self._size = size
        self._entries: OrderedDict[bytes, Callable[..., Any]] = OrderedDict()

    def get(self, data: bytes) -> Callable[..., Any]:
        """Return the function ``data`` encodes, deserializing it only the first time."""
        func = self._entries.get(data)
        if func is None:
            func = loads(data)
            self._entries[data] = func
            if len(self._entries) > self._size:
                self._entries.popitem(last=False)  # the least recently used
        else:
            self._entries.move_to_end(data)
        return func


def dumps_exception(exc: BaseException) -> tuple[bytes | None, str, str]:
    """Serialize a task's exception for the client.

    Returns:
        ``(payload, message, traceback)``: payload is None when the exception cannot be
        pickled and unpickled again (the client then raises :class:`RemoteError`).
    """
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    message = f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"
    payload: bytes | None
    try:
        payload = dumps(exc)
        loads(payload)
    except Exception:
        payload = None
    return payload, message, text


def loads_exception(payload: bytes | None, message: str, remote_traceback: str) -> BaseException:
    """Rebuild a task's exception, with the remote traceback as its ``__cause__``.

    Falls back to :class:`RemoteError` when the exception's type cannot be rebuilt here.
    """
    exc: Any = None
    if payload is not None:
        try:
            exc = loads(payload)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = RemoteError(message, message.split(":", 1)[0], remote_traceback)
    if remote_traceback:
        exc.__cause__ = RemoteTraceback(remote_traceback)
    return exc
