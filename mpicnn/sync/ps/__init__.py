"""Parameter-server modes: ps-sync, ps-async (Downpour) and SSP, parameters sharded over servers.

- ``layout``: roles and parameter ranges (pure); whole tensors for layer-wise optimizers.
- ``protocol``: the wire format: message kinds, tags, headers, chunked payloads.
- ``policy``: SSP, batch dispatch, the stop step and ``--staleness`` (pure).
- ``flatstate``: optimizer state as flat vectors (sharded over servers, checkpointed).
- ``role``: what workers and servers share: communicators, ranges, run statistics.
- ``staging``: a worker's parameters and gradients through one flat (pinned) host buffer
  each way.
- ``server``: the server loop; ``worker``: the training loop's strategy on workers.
"""
from __future__ import annotations


def make_ps_strategy(cfg, world):
    """This rank's side of a parameter-server job: a PSServer or a PSWorker."""
    from .layout import roles
    from .server import PSServer
    from .worker import PSWorker

    layout = roles(world.size, cfg.sync.servers, cfg.sync.mode)
    server = layout.is_server(world.rank)
    train_comm = world.comm.Split(color=int(server), key=world.rank)
    ps_comm = world.comm.Dup()      # PS traffic can never match a collective or another tag
    world.log.info(f"{cfg.sync.mode}: {layout.workers} worker(s) (ranks 0-{layout.workers - 1}), "
                   f"{layout.servers} server(s) (ranks {layout.workers}-{world.size - 1})")
    return (PSServer if server else PSWorker)(world, cfg, layout, train_comm, ps_comm)
