"""A worker rank: computes gradients, pushes them to the servers, pulls fresh parameters."""
from __future__ import annotations

import numpy as np
import torch

from ...cluster.world import reduce_sums
from ...observe import timeline
from ...resilience.nan_policy import grads_finite
from ..replicas import average_buffers
from . import protocol as P
from .flatstate import set_flat_state, state_keys
from .role import PSRole, decode_stats, summarize
from .staging import FlatStaging


class PSWorker(PSRole):
    """The training loop's strategy on a worker; the optimizer step happens on the servers.

    Each step pushes this worker's gradient slices to every server and waits for their
    replies (fresh parameters; in ps-async a server may defer its reply to bound staleness).
    """

    def attach(self, model, optimizer, scheduler) -> None:
        super().attach(model, optimizer, scheduler)
        self.staging = FlatStaging(self.params)
        self.flat_params, self.flat_grads = self.staging.params, self.staging.grads
        self.params_np, self.grads_np = self.flat_params.numpy(), self.flat_grads.numpy()
        self.requests = [P.header() for _ in self.ranges]
        self.replies = [P.header() for _ in self.ranges]
        self.clock = self.version = self.counted = 0
        self.item, self.window = P.NO_ITEM, (0, 0)
        self.flags, self.stop_at, self.skipped = 0, -1, False
        # images one update trains on: a global batch (ps-sync) or one worker's batch
        self.images_per_update = self.cfg.training.batch_size * (self.workers if self.sync else 1)

    @property
    def synced_grads(self) -> bool:
        return False          # .grad is this worker's own gradient: NaN checks may differ

    def after_backward(self, finalize=None) -> None:
        # Unscaled, clipped and checked before pushing: the servers apply what workers send,
        # and a non-finite gradient never reaches a server.
        finite = not bool(finalize(self.params)) if finalize is not None \
            else grads_finite(self.params)
        self.flags = self.flags & P.STOP | (0 if finite else P.NONFINITE)
        self.staging.gradients_out(self.params)
        self.clock += 1
        self._exchange(P.PUSH)
        self.skipped = bool(self.replies[0][P.SKIPPED])

    def agreed_skip(self, found: torch.Tensor) -> torch.Tensor:
        """Whether the servers dropped the update this push went into: in ps-sync the whole
        step's (any worker's gradient was not finite: the same on every worker), in
        ps-async this push's own."""
        return torch.full((), float(self.skipped), device=found.device)

    @property
    def skips_on_device(self) -> bool:
        return False          # the servers decided; the worker takes their parameters

    def step(self, found_inf=None) -> None:
        self.staging.parameters_in(self.params)

    def skip_step(self) -> None:
        """The servers dropped the non-finite gradient: take their parameters as they are."""
        self.step()

    def agree_stop(self, wanted: bool, step: int) -> bool:
        """Stop at the global step server 0 fixed once a worker reported a stop signal.

        ps-sync workers run in lockstep and agree by one collective among themselves;
        ps-async workers carry the wish in their next push and never wait for each other.
        """
        if self.lockstep:
            return bool(reduce_sums(self.train_comm, [float(wanted)])[0] > 0)
        if wanted:
            self.flags |= P.STOP
        return 0 <= self.stop_at <= step

    def trained_images(self, global_batch: int) -> int:
        """Images the servers' updates since the last call trained on (any worker's)."""
        images = (self.version - self.counted) * self.images_per_update
        self.counted = self.version
        return images

    def batches(self, loader, state, run_steps: int):
        if not self.dispatched:
            return super().batches(loader, state, run_steps)
        return self._dispatched(loader, state, run_steps)

    def _dispatched(self, loader, state, run_steps: int):
        """Batches as the dispatcher on server 0 hands them out, until the epoch's are gone."""
        workers = self.workers
        end = min(loader.steps_in(state.epoch),
                  state.step_in_epoch + run_steps - state.global_step) * workers
        self.window = ((state.global_step - state.step_in_epoch) * workers, end)
        self._exchange(P.PULL, epoch=state.epoch, first=state.step_in_epoch * workers, end=end,
                       base=self.window[0])
        self.step()
        self.counted = self.version
        while self.item != P.NO_ITEM:
            step, rank = divmod(self.item, workers)
            yield loader.rows_batch(loader.plan_for(rank, state.epoch)[step], state.epoch)

    def weight(self, loader, state) -> float:
        if not self.dispatched:
            return super().weight(loader, state)
        step, rank = divmod(self.item, self.workers)     # the item being computed
        return loader.weight(state.epoch, step, rank)

    def position(self) -> int | None:
        """Dispatched: the global step of this worker's next item, or the epoch's end."""
        if not self.dispatched:
            return None
        base, end = self.window
        position = (base + (self.item if self.item != P.NO_ITEM else end)) // self.workers
        if self.item == P.NO_ITEM and self.stop_at >= 0:     # the epoch was cut short
            position = min(position, self.stop_at)
        return position

    def sync_buffers(self) -> None:
        """Average buffers over workers, pull the final parameters (and optimizer state)."""
        average_buffers(self.train_comm, self.model)
        self._exchange(P.PULL)
        self.step()
        self.counted = self.version
        if self.world.is_root:
            self._fetch_stats()
            if self.cfg.output.checkpoint_dir:
                self._fetch_state()

    def _fetch_stats(self) -> None:
        """Ask every server for its counters so far (for the epoch metrics record)."""
        from mpi4py import MPI

        rows = []
        for s, request in enumerate(self.requests):
            server = self.roles.server_rank(s)
            request[:] = (P.STATS, self.clock, -1, 0, 0, 0, 0)
            self.ps_comm.Send(request, dest=server, tag=P.TAG_REQUEST)
            self.ps_comm.Recv(self.replies[s], source=server, tag=P.TAG_REPLY)
            vector = np.empty(int(self.replies[s][P.COUNT]), dtype=np.int64)
            MPI.Request.Waitall(P.irecv_array(self.ps_comm, vector, server))
            rows.append((True, *decode_stats(vector, self.workers)))
        self._report = summarize(rows, self.roles, final=False)

    def _exchange(self, kind: int, epoch: int = -1, first: int = 0, end: int = 0,
                  base: int = 0) -> None:
        """Send one request to every server and wait for all their parameter replies."""
        from mpi4py import MPI

        comm, receives, sends = self.ps_comm, [], []
        self.staging.host_writable()       # the last parameter copy has read the host buffer
        for s, (lo, hi) in enumerate(self.ranges):      # receives first: no unexpected messages
            server = self.roles.server_rank(s)
            receives.append(comm.Irecv(self.replies[s], source=server, tag=P.TAG_REPLY))
            receives += P.irecv_array(comm, self.params_np[lo:hi], server)
        for s, (lo, hi) in enumerate(self.ranges):
            server, request = self.roles.server_rank(s), self.requests[s]
            request[:] = (kind, self.clock, epoch, first, end, base, self.flags)
            sends.append(comm.Isend(request, dest=server, tag=P.TAG_REQUEST))
            if kind == P.PUSH:
                sends += P.isend_array(comm, self.grads_np[lo:hi], server)
        with timeline.span("ps_push" if kind == P.PUSH else "ps_pull"):
            MPI.Request.Waitall(sends)
        with timeline.span("ps_pull"):
            MPI.Request.Waitall(receives)
        self.version = int(self.replies[0][P.VERSION])
        self.item = int(self.replies[0][P.ITEM])
        self.stop_at = int(self.replies[0][P.STOP_AT])

    def _fetch_state(self) -> None:
        """Copy the servers' optimizer state into the local optimizer, for checkpoints."""
        from mpi4py import MPI

        keys, comm = state_keys(self.cfg.training), self.ps_comm
        vectors = {k: torch.zeros_like(self.flat_params) for k in keys}
        for s, (lo, hi) in enumerate(self.ranges):
            server, request = self.roles.server_rank(s), self.requests[s]
            request[:] = (P.STATE, self.clock, -1, 0, 0, 0, 0)
            comm.Send(request, dest=server, tag=P.TAG_REQUEST)
            comm.Recv(self.replies[s], source=server, tag=P.TAG_REPLY)
            if self.replies[s][P.COUNT]:
                MPI.Request.Waitall([r for k in keys for r in
                                     P.irecv_array(comm, vectors[k].numpy()[lo:hi], server)])
        if all(reply[P.COUNT] for reply in self.replies):
            set_flat_state(self.optimizer, self.params, self.cfg.training,
                           int(self.replies[0][P.STEP]), vectors)

    def finish(self) -> None:
        if self.attached:
            from mpi4py import MPI

            done = []
            for s, request in enumerate(self.requests):
                request[:] = (P.DONE, self.clock, -1, 0, 0, 0, 0)
                done.append(self.ps_comm.Isend(request, dest=self.roles.server_rank(s),
                                               tag=P.TAG_REQUEST))
            MPI.Request.Waitall(done)
            self.stats["unreceived"] = P.drain(self.ps_comm)
        super().finish()
