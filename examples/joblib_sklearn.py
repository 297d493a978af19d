"""joblib and scikit-learn on Argon: ``n_jobs`` uses the network's processes.

Needs ``pip install 'argon-tasks[joblib]' scikit-learn``. Without ``--connect`` the
backend starts a local network of its own.

    python examples/joblib_sklearn.py [--connect HOST:PORT] [--key-file FILE]
"""

from __future__ import annotations

import argparse

from _network import add_network_options
from joblib import Parallel, delayed, parallel_config

import argon.joblib


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="joblib.Parallel and scikit-learn on Argon.")
    add_network_options(parser)
    args = parser.parse_args(argv)

    from sklearn.datasets import load_digits
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import cross_val_score

    argon.joblib.register()
    address = f"{args.connect[0]}:{args.connect[1]}" if args.connect else None
    with parallel_config(backend="argon", address=address, key_file=args.key_file, processes=2):
        squares = Parallel(n_jobs=-1)(delayed(pow)(i, 2) for i in range(10_000))
        print(f"Parallel(n_jobs=-1) over 10000 calls: sum of squares = {sum(squares)}")
        features, labels = load_digits(return_X_y=True)
        model = RandomForestClassifier(n_estimators=50, random_state=0)
        scores = cross_val_score(model, features, labels, cv=4, n_jobs=-1)
        print(f"cross_val_score(RandomForest, digits, cv=4, n_jobs=-1): mean accuracy {scores.mean():.3f}")


if __name__ == "__main__":
    main()
