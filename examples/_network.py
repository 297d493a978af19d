"""What every example shares: the ``--connect``/``--key-file`` options and the network.

An example runs against the manager given with ``--connect HOST:PORT``, or else starts
a small network of its own on loopback (``LocalCluster``) and stops it at the end.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

from argon import Client, LocalCluster


def address(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (an IPv6 host may be written in brackets)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def add_network_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--connect`` and ``--key-file`` to an example's options."""
    parser.add_argument("--connect", type=address, metavar="HOST:PORT", help="use this manager")
    parser.add_argument("--key-file", metavar="FILE", help="the network's shared key file")


@contextlib.contextmanager
def network(args: argparse.Namespace, nodes: int = 1, workers: int = 2) -> Iterator[Client]:
    """A client of the manager given with ``--connect``, or of a network started for this run."""
    if args.connect is not None:
        host, port = args.connect
        print(f"using the manager at {host}:{port}")
        with Client(host, port, key_file=args.key_file) as client:
            yield client
        return
    with LocalCluster(nodes=nodes, workers=workers, key_file=args.key_file) as cluster, cluster.client() as client:
        shape = f"{nodes} node{'s' * (nodes != 1)} x {workers} processes"
        print(f"started a local network: manager {cluster.address}, {shape}")
        yield client
