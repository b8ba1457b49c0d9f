"""GenRef data: webdataset shards, subset mixing by global step, paired transforms, synthetic shards.

Modules: `datamodule` (GenRefDataModule), `stream` (the batch stream and its resume), `schedule` (subset
warm-up), `sources` (shard patterns, checks, raw reading), `transforms` (paired crop, drops), `synthetic`
(GenRef-format shards for tests). The names below are imported on first use, so `import reflectionflow.data`
stays light (no Lightning import) for code that needs only one module.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "GenRefDataModule": "reflectionflow.data.datamodule",
    "SubsetSchedule": "reflectionflow.data.schedule",
    "SKIP_REASONS": "reflectionflow.data.sources",
    "ShardSourceError": "reflectionflow.data.sources",
    "check_shards": "reflectionflow.data.sources",
    "cached_synthetic_shards": "reflectionflow.data.synthetic",
    "write_synthetic_shards": "reflectionflow.data.synthetic",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'reflectionflow.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
