"""HDF5 data, from the file to this rank's normalised batches; tools in ``python -m mpicnn.data``.

Reading, in the order a batch passes through:

- ``schema``: the file format: open read-only (``open_h5``), check a file against the
  schema, describe it as a ``Dataset`` of ``Split``s.
- ``layout``: image layouts (nchw, nhwc, nhw): detection, the (C, H, W) of a sample,
  the one transform to NCHW.
- ``chunks``: row counts of HDF5 I/O that writer and reader agree on: chunks, read
  units, write blocks.
- ``shard``: the shard plan: which rows each rank reads at each step, and the rest of an
  epoch continued at another layout (pure: no MPI, no I/O).
- ``stores``: where a reader keeps the units it has read: a bounded LRU, or the whole
  range with ``--cache``.
- ``reader``: rows of one split read through chunk-aligned units, as NCHW (no torch).
- ``memory``: whether what ``--cache`` keeps fits in the node's memory.
- ``prefetch``: reading ahead of the loop: inline, in a thread, or in a reader process.
- ``augment``: ``--augment`` crop and flip on the device, fixed by (seed, epoch, row).
- ``resident``: ``--data-on-device``: the rows a rank reads held on its device as
  stored, each batch gathered there.
- ``loader``: this rank's batches on the device, normalised and augmented (``Loader``,
  ``make_loaders``).

Writing and the tools (``__main__``: ``digits``, ``synth``, ``convert``, ``inspect``):

- ``writer``: mpicnn HDF5 written block by block, atomically, in whole-sample chunks.
- ``stats``: per-channel mean and std, accumulated block by block.
- ``sources``: what ``convert`` reads: .npz/.npy/.h5 arrays and folders of class folders.
- ``idx``: IDX files of the MNIST family (plain or .gz), pairs found in a folder.
- ``cifar``: CIFAR-10/100 python batches from their folder or ``.tar.gz``.
- ``formats``: which of these readers a ``convert`` SOURCE needs.
- ``convert``: a source written as mpicnn HDF5, rows shuffled, val split stratified.
- ``synth``: a learnable synthetic dataset of any size.
- ``digits``: the UCI handwritten digits from scikit-learn.
- ``inspect``: a file validated as training would, described, slow layouts flagged;
  ``--write-stats``.
"""
