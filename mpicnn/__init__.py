"""mpicnn: data-parallel CNN training over MPI.

One training step runs down this line, and the packages follow it:

- ``train``: the entry (``mpirun -n N python -m mpicnn.train``): build, train or serve, close;
  ``__main__`` lists the commands, ``report`` is the entry of ``python -m mpicnn.report``,
  ``run`` of ``python -m mpicnn.run`` (restart a launch after a crash).
- the trained model out of a checkpoint: ``export`` (TorchScript, ONNX, state_dict),
  ``predict`` (classes and probabilities to CSV), ``evaluate`` (loss and accuracy on any
  number of ranks, no training).
- ``config``: settings in sections (data, training, sync, output, failure), flags and TOML.
- ``cluster``: where ranks run: the MPI world, nodes, devices, the batch job, errors, jobs
  as processes, and emulated nodes on one machine (``python -m mpicnn.cluster``).
- ``data``: HDF5 schema, the pure shard plan, readers, prefetch, augmentation, data tools.
- ``training``: the model zoo, optimizers and schedules, the epoch loop, the ``Trainer``.
- ``sync``: what the loop calls to combine gradients: the allreduce engine, the parameter server.
- ``checkpoint``: checkpoint files, their checksum, the training state, rank 0's writer.
- ``resilience``: stop signals, the stall watchdog, the NaN policy, restart supervision;
  test-only drills.
- ``observe``: step statistics, metrics records, progress, timeline; ``report`` plots them.
- ``bench``: benchmarks against the peers (DDP), side by side, as ratios.
"""

__version__ = "0.1.0"
