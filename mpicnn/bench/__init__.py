"""Benchmarks (``python -m mpicnn.bench <name>``): side by side with peers, as ratios.

- ``launch``: a benchmark run's records or JSON result, read back (jobs start through
  ``mpicnn.cluster.jobs``).
- ``comm``: the allreduce engine against DDP-gloo and a flat Allreduce.
- ``ps``: allreduce against ps-sync and ps-async, with and without a straggler.
- ``scale``: alpha/beta measured here, throughput predicted for 1..1024 ranks; with
  ``--link --compare``, measured across emulated nodes and checked against ``cluster``.
- ``cluster``: mpicnn's collectives against DDP-gloo across emulated nodes (root),
  like for like (fp32, bf16 vs the fp16 hook, PowerSGD vs its hook), with a no-comm
  ceiling and each variant's link bound.
- ``data``: loader throughput and data wait on a large HDF5 file.
- ``failure_overhead``: what the NaN check and the stall watchdog cost per step.
- ``stopcheck``: what the per-step stop agreement costs (run under ``mpirun``).
- ``tta``: wall time to a validation accuracy on Fashion-MNIST, mpicnn against DDP.
- ``largebatch``: final accuracy at global batches 256 to 8,192 for SGD, LARS, AdamW, LAMB.
- ``checkpoint``: the step-time stall of a checkpoint, synchronous against asynchronous.
- ``pipeline``: pipeline grids (K x 1 ... 1 x K) at M micro-batches against data
  parallelism: images/s, measured bubble against (K-1)/(M+K-1), parameters per rank.
- ``gpu``: the prepared GPU command: ``pytest -m gpu``, a bare PyTorch loop against
  mpicnn.train (fp32, bf16, bf16 + channels_last; 1 and 2 ranks), the CUDA-aware choice;
  ``--dry-run`` on the CPU.
- ``overhead``: what one mpicnn rank adds to a bare PyTorch step: host operators,
  kernels, device waits and milliseconds per step, from torch.profiler (``--profile``).
- ``_bare``: the bare PyTorch loop ``gpu`` and ``overhead`` race.
- ``_bandwidth``, ``_ddp_peer``: the programs ``comm`` and ``cluster`` start on their
  ranks (DDP over gloo, optionally with its fp16 or PowerSGD compression hook);
  ``_ddp_powersgd``: DDP's PowerSGD hook with a gloo group a bucket.
- ``_tta_ddp``: the DDP + DataLoader script ``tta`` races; ``_gloo``: the DDP peers'
  process group.
- ``__main__``: ``python -m mpicnn.bench NAME`` runs one of them.
"""
