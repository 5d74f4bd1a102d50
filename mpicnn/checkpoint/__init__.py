"""Checkpoints: what they hold, how they are written and found, and resuming from them.

- ``files``: atomic writes, safe loads, finding the newest, pruning.
- ``checksum``: the SHA-256 of a checkpoint's content, stored inside it.
- ``state``: ``RunState`` (where the run is), the saved training state, ``restore``.
- ``position``: where a run stands in samples; where a run of another world size or
  global batch continues from there.
- ``writer``: writing now or in the background (host copy, one write in flight).
- ``checkpointer``: rank 0's checkpoints (cadence, stop saves, ``config.toml``, pruning).
- ``trained``: the model a checkpoint holds, rebuilt from it alone and taking images as
  the HDF5 file stores them (``load_model``; export, predict, evaluate).
"""
