"""A parameter-server rank: one range of the flat parameters, its optimizer, and the loop."""
from __future__ import annotations

import numpy as np
import torch

from ...cluster.errors import MpicnnError
from ...observe import timeline
from ...training.optim import LAYERWISE, build_optimizer
from ..flat import flatten, views
from . import protocol as P
from .flatstate import flat_state, set_flat_state, state_keys
from .policy import Dispatcher, may_proceed, stop_step
from .role import PSRole, encode_stats


class PSServer(PSRole):
    """Applies pushed gradients to its range with the run's optimizer and schedule.

    ps-sync: one update per step from all workers' gradients, summed in worker order,
    then every worker gets the new parameters. ps-async: each push is one update on
    arrival, its reply deferred (never blocking the loop) while the pusher is more than
    ``--staleness`` clocks ahead of the slowest worker.
    """

    @property
    def trains(self) -> bool:
        return False

    @property
    def worker_index(self) -> int:
        return 0                        # servers read no data

    def attach(self, model, optimizer, scheduler) -> None:
        super().attach(model, optimizer, scheduler)
        index = self.world.rank - self.roles.workers
        self.lo, self.hi = self.ranges[index]
        flat = flatten(self.params, device="cpu")
        self.param = torch.nn.Parameter(flat[self.lo: self.hi].clone())
        self.pieces = self._pieces()
        self.server_opt = build_optimizer(self.cfg.training, self.pieces,
                                          self.cfg.training.batch_size * self.workers)
        restored = flat_state(optimizer, self.params, self.cfg.training)
        if restored is not None:
            step, vectors = restored
            set_flat_state(self.server_opt, self.pieces, self.cfg.training, step,
                           {k: v[self.lo: self.hi] for k, v in vectors.items()})
        # The workers' schedule, at the restored position, drives this range's lr.
        self.server_sched = torch.optim.lr_scheduler.LambdaLR(self.server_opt,
                                                              scheduler.lr_lambdas[0])
        self.server_sched.load_state_dict(scheduler.state_dict())
        for ours, theirs in zip(self.server_opt.param_groups, optimizer.param_groups):
            ours["lr"] = theirs["lr"]
        self.per_step = 1 if self.sync else self.workers   # updates per global step
        self.version = self.restored_version = scheduler.last_epoch * self.per_step
        workers = self.workers
        self.param_np = self.param.detach().numpy()
        self.grads = [np.empty_like(self.param_np) for _ in range(workers if self.sync else 1)]
        self.outs = [np.empty_like(self.param_np) for _ in range(workers)]
        self.reply_headers = [P.header() for _ in range(workers)]
        self.sends = [[] for _ in range(workers)]
        self.extra_sends, self.extra_bufs = [], []
        self.clocks, self.seen = [0] * workers, [self.version] * workers
        self.done, self.deferred, self.arrived = [False] * workers, set(), 0
        self.round_finite = True           # ps-sync: every push of this step was finite
        self.dropped = [False] * workers   # the update of each worker's last push was dropped
        # Server 0 decides what all workers must agree on: who computes which batch
        # (ps-async, unbounded) and the global step at which a stop signal takes effect.
        self.decides = index == 0
        self.dispatcher = Dispatcher(workers) if self.dispatched and self.decides else None
        self.stop_at = -1

    def _pieces(self) -> list:
        """What the optimizer steps: the flat range, or for layer-wise optimizers its whole
        tensors, each a view of the range in the tensor's shape (they share its memory)."""
        if self.cfg.training.optimizer not in LAYERWISE:
            return [self.param]
        pieces, offset = [], 0
        for p in self.params:
            lo, hi = offset, offset + p.numel()
            offset = hi
            if self.lo <= lo and hi <= self.hi:
                view = self.param.data[lo - self.lo: hi - self.lo].view(p.shape)
                pieces.append(torch.nn.Parameter(view))
        return pieces

    def _set_grad(self, grad: torch.Tensor | None) -> None:
        """Hand the flat gradient of the range to what the optimizer steps (views, no copy)."""
        pieces = views(grad, self.pieces) if grad is not None else [None] * len(self.pieces)
        for piece, piece_grad in zip(self.pieces, pieces):
            piece.grad = piece_grad

    def serve(self) -> None:
        from mpi4py import MPI

        request, status = P.header(), MPI.Status()
        while not all(self.done):
            # A matched probe, not a wildcard Recv: across nodes on MPICH's ch4:ucx a blocking
            # Recv(ANY_SOURCE) never matched requests that had arrived (the PS hang).
            self.ps_comm.Mprobe(MPI.ANY_SOURCE, P.TAG_REQUEST, status).Recv(request)
            worker, kind = status.Get_source(), int(request[P.KIND])
            if kind == P.PUSH:
                if request[P.FLAGS] & P.STOP:
                    self._stop()
                self._push(worker, finite=not request[P.FLAGS] & P.NONFINITE)
            elif kind == P.PULL:
                if self.dispatcher is not None and request[P.EPOCH] >= 0:
                    self.dispatcher.open(*map(int, request[[P.EPOCH, P.FIRST, P.END, P.BASE]]))
                self._reply(worker, dispatch=request[P.EPOCH] >= 0)
            elif kind == P.STATE:
                self._send_state(worker)
            elif kind == P.STATS:
                vector = encode_stats(self._counters(), self.staleness, self.workers)
                self._send_extra(worker, P.header(), [vector], vector.size)
            elif kind == P.DONE:
                self.done[worker] = True
                self._release()
            else:
                raise MpicnnError(f"parameter server: unknown request {kind} from rank {worker}")
        for requests in self.sends + [self.extra_sends]:
            MPI.Request.Waitall(requests)
        self.stats = {**self._counters(), "unreceived": P.drain(self.ps_comm)}

    def _counters(self) -> dict:
        """This run's counters: updates applied, pushes per worker, deferrals, largest lead."""
        return {**self.stats, "updates": self.version - self.restored_version,
                "pushes": list(self.clocks)}

    def _stop(self) -> None:
        """A worker got a stop signal: fix the global step where every worker stops."""
        if not self.decides or self.stop_at >= 0:
            return
        every = self.cfg.failure.stop_check_every
        if self.dispatcher is not None:
            self.stop_at = self.dispatcher.stop(every)
        else:       # fixed shards: past every clock reached or in flight
            self.stop_at = stop_step(self.restored_version // self.per_step +
                                     max(self.clocks) + 1, every)

    def _push(self, worker: int, finite: bool) -> None:
        from mpi4py import MPI

        timeline.step(self.version // self.per_step)     # the global step being applied
        grad = self.grads[worker if self.sync else 0]
        MPI.Request.Waitall(P.irecv_array(self.ps_comm, grad, worker))
        self.clocks[worker] += 1
        staleness = self.version - self.seen[worker]
        self.staleness[staleness] += 1
        if self.sync:
            self.arrived += 1
            self.round_finite &= finite
            if self.arrived < self.workers:
                return
            total = self.grads[0].copy()
            for other in self.grads[1:]:        # a fixed order: reproducible sums
                total += other
            with timeline.span("ps_apply", workers=self.workers):
                self._apply(total, 1, self.round_finite)
            self.dropped = [not self.round_finite] * self.workers
            self.arrived, self.round_finite = 0, True
            for w in range(self.workers):
                self._proceed(w)
            return
        lr_divisor = max(1, staleness) if self.cfg.sync.staleness_lr else 1
        with timeline.span("ps_apply", worker=worker, staleness=staleness):
            self._apply(grad, lr_divisor, finite)
        self.dropped[worker] = not finite
        if self._may_proceed(worker):
            self._proceed(worker)
        else:
            self.deferred.add(worker)
            self.stats["deferred"] += 1
        self._release()

    def _apply(self, grad_sum: np.ndarray, lr_divisor: int, finite: bool) -> None:
        """One optimizer step on this range with the mean gradient of the workers.

        A gradient that a worker found non-finite (``--nan-policy skip``) is dropped as
        allreduce drops it: no update, but the version and the schedule move on.
        """
        if finite:
            grad_sum /= self.workers     # async: one worker's share of a global batch
            self._set_grad(torch.from_numpy(grad_sum))
            group = self.server_opt.param_groups[0]
            lr = group["lr"]
            group["lr"] = lr / lr_divisor
            self.server_opt.step()
            group["lr"] = lr
            self._set_grad(None)
        else:
            self.stats["skipped"] += 1
        self.version += 1
        if self.version % self.per_step == 0:
            self.server_sched.step()

    def _may_proceed(self, worker: int) -> bool:
        return may_proceed(self.clocks[worker], self.clocks, [not d for d in self.done],
                           self.bound)

    def _release(self) -> None:
        """Send the deferred replies whose workers are back within the staleness bound."""
        for worker in sorted(self.deferred):
            if self._may_proceed(worker):
                self.deferred.discard(worker)
                self._proceed(worker)

    def _proceed(self, worker: int) -> None:
        """Let a worker compute its next gradient: reply to its push (recording its lead)."""
        live = [c for c, d in zip(self.clocks, self.done) if not d]
        lead = self.clocks[worker] - min(live, default=self.clocks[worker])
        self.stats["max_lead"] = max(self.stats["max_lead"], lead)
        self._reply(worker, dispatch=True)

    def _reply(self, worker: int, dispatch: bool = False) -> None:
        """Start sending the current parameters (and, when asked, the worker's next batch)."""
        from mpi4py import MPI

        # The worker asked again, so it has received the previous reply: this cannot block.
        MPI.Request.Waitall(self.sends[worker])
        out, head = self.outs[worker], self.reply_headers[worker]
        out[:] = self.param_np
        head[:] = 0
        head[P.VERSION] = self.version
        head[P.ITEM] = self.dispatcher.take(worker) if dispatch and self.dispatcher \
            is not None else P.NO_ITEM
        head[P.STOP_AT] = self.stop_at
        head[P.SKIPPED] = self.dropped[worker]
        self.sends[worker] = [self.ps_comm.Isend(head, dest=worker, tag=P.TAG_REPLY),
                              *P.isend_array(self.ps_comm, out, worker)]
        self.seen[worker] = self.version

    def _send_state(self, worker: int) -> None:
        """Start sending this range's optimizer state (for a checkpoint on ``worker``)."""
        state = flat_state(self.server_opt, self.pieces, self.cfg.training)
        head = P.header()
        if state is None:
            self._send_extra(worker, head, [], 0)
        else:
            head[P.STEP] = state[0]
            vectors = [state[1][k].numpy() for k in state_keys(self.cfg.training)]
            self._send_extra(worker, head, vectors, len(vectors))

    def _send_extra(self, worker: int, head: np.ndarray, arrays: list, count: int) -> None:
        """Start sending a reply header and ``arrays`` (rare requests: STATE, STATS)."""
        from mpi4py import MPI

        MPI.Request.Waitall(self.extra_sends)      # the worker asked again: already received
        head[P.VERSION], head[P.COUNT] = self.version, count
        self.extra_bufs = [head, *arrays]          # alive until the sends complete
        self.extra_sends = [self.ps_comm.Isend(head, dest=worker, tag=P.TAG_REPLY)]
        for array in arrays:
            self.extra_sends += P.isend_array(self.ps_comm, array, worker)
