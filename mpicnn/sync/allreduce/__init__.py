"""The allreduce engine: gradients averaged in buckets while backward runs.

- ``strategy``: ``AllreduceStrategy``, what the training loop calls.
- ``buckets``: which parameters share a bucket, and the flat views into it.
- ``reducer``: one bucket's reduction (encode, collective, decode, divide).
- ``comm_thread``: the thread that runs reductions beside backward.
- ``factors``: a fully connected layer's gradient sent as the batch's factors and rebuilt.
- ``deferred``: ``--overlap-forward``'s updates that land as the next forward reaches them.
- ``codec``: fp16/bf16 compression on the wire.
- ``powersgd``: ``--compression powersgd``: matrices as low-rank factors, with error feedback.
- ``transport``: device buffers to MPI, directly (CUDA-aware) or staged through pinned memory.
- ``scratch``: per-bucket buffers (wire casts, host staging) made once and reused.
- ``collectives``: the ``Collective`` family: flat, hierarchical, shared-memory windows.
- ``ring``: mpicnn's ring allreduce of point-to-point messages, across 3 or more nodes.
"""
