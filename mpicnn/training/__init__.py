"""What one rank computes: the model zoo, optimizer and schedule, the epoch loop, the Trainer.

- ``models``: the zoo and ``build_model`` (zoo names or ``package.module:Class`` in the
  constructor shapes users bring), the check of a model's output shape.
- ``optim``: optimizers (fused where the device has them) and lr schedules, which follow
  training progress after a resume at another global batch.
- ``layerwise``: LARS and LAMB, each tensor's step scaled by a trust ratio.
- ``precision``: ``--amp`` (autocast, the fp16 loss scale) and ``--clip-grad-norm``:
  what happens to a step's gradient between averaging and the update.
- ``adapt``: what ``--channels-last`` and ``--sync-bn`` make of a built model.
- ``compiled``: ``--compile``: torch.compile of the model in place (CUDA graphs on a GPU
  in reduce-overhead mode).
- ``syncbn``: SyncBatchNorm over MPI (statistics and their gradients summed over ranks).
- ``loop``: one epoch of training steps and one evaluation pass, with no mode branches.
- ``trainer``: what a run builds on every rank (``build_parts``) and the ``Trainer`` that
  runs the epochs, evaluates, checkpoints and writes the records on training ranks.
"""
