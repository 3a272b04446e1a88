"""`--json=PATH`: the figures with the versions that ran and XLA_FLAGS beside them, the file `benchmark_suite`
reads for its report."""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys

from etils import epath


def write_json(path: str, figures: dict) -> None:
    """`figures` and what a report needs beside them: the versions that ran and the flags XLA ran with."""
    versions = {}
    for name in ("jax", "jaxlib", "flax", "torch", "transformers"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    run = {"argv": sys.argv[1:], "xla_flags": os.environ.get("XLA_FLAGS", ""), "versions": versions}
    epath.Path(path).write_text(json.dumps({**figures, **run}, indent=1))
