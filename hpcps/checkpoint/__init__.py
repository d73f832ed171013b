"""HDF5 checkpoint shards, committed by a directory rename; resume and resharding.

See docs/checkpoint-format.md for the layout on disk. Public API:

- ``Checkpointer(cfg, roles, layout, describe)``: ``find_resume()``, the collective
  ``save(step, shard=..., worker=..., reason=...)`` and ``close()``.
- ``ResumePoint``: ``path``, ``step``, ``load_shard(lo, hi)``, ``load_worker(i, W)``.
- ``open_checkpoint(path_or_run_dir) -> CheckpointReader``: ``manifest``, ``step``,
  ``config``, ``params()``, ``tokenizer_json()``.
"""

from hpcps.checkpoint.reader import CheckpointReader, ResumePoint, open_checkpoint  # noqa: F401
from hpcps.checkpoint.writer import Checkpointer  # noqa: F401
