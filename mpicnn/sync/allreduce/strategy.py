"""Synchronous data parallelism: gradients averaged over all ranks, hidden behind backward.

The engine (``--bucket-mb`` > 0), in the manner of DDP's Reducer and Horovod's
tensor fusion:

* parameters are grouped, in backward order, into flat buckets and every
  ``.grad`` is a view into its bucket, so nothing is copied in or out;
* a post-accumulate-grad hook per parameter counts its bucket down; complete
  buckets are handed, strictly in bucket order (the same on every rank), to the
  communication thread, which averages them while backward goes on;
* ``after_backward`` waits only for what is still in flight, then reduces the last
  bucket (and any holding unused parameters) itself; the loop times this as ``comm``;
* after the first step the buckets are rebuilt in the order the gradients
  actually became ready (rank 0's observation, broadcast so all ranks agree).

``--overlap-forward`` goes further (``deferred``): the last bucket is averaged at once on
a channel of its own (its own communicators and windows, past the thread's queue), and
the buckets still in flight are waited for, and their parameters updated, only when the
next forward reaches the modules that own them.

``--sufficient-factors`` (``factors``) gives a wide fully connected weight a bucket of its
own whose exchange gathers the batch's factors and rebuilds the average from them.

``--compression powersgd[:RANK]`` (``powersgd``) averages every other bucket as low-rank
factors after ``--powersgd-start`` steps (the plain path: all gradients as one bucket).

``--bucket-mb 0`` keeps the plain path: all gradients concatenated, one blocking
Allreduce after backward, copied back (also the benchmark's simple baseline).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from functools import partial

import torch

from ...cluster.errors import MpicnnError
from ...cluster.world import cuda_aware_override
from ..contract import Strategy
from ..flat import flatten, unflatten_into
from ..replicas import average_buffers, broadcast_module
from .buckets import FIRST_BUCKET_BYTES, MB, bucket_plan, build_buckets, same_plan
from .codec import HALF_DTYPES, Codec
from .collectives import FlatAllreduce, HierarchicalAllreduce, SharedMemoryAllreduce
from .comm_thread import BusyTime, make_runner
from .deferred import DeferredUpdate
from .factors import AUTO_BYTES_GAIN, FactorCapture, FactorExchange, worth_factoring
from .powersgd import PowerSGD, low_rank
from .reducer import Reducer
from .ring import uses_ring
from .transport import choose_path, probe_cuda_support

PLAIN_KEY = "plain"


class AllreduceStrategy(Strategy):
    """Bucketed allreduce overlapped with backward, or the plain flat Allreduce."""

    name = "allreduce"
    powersgd: PowerSGD | None = None              # --compression powersgd: its state

    def __init__(self, world, cfg):
        super().__init__(world, cfg)
        self.params, self.buckets, self.reducer, self.runner = [], [], None, None
        self.late, self.deferred = None, None     # --overlap-forward: the last bucket's channel
        self.factors = {}                         # param index -> its FactorExchange
        self._watch_landing = nullcontext         # the stall watch's mark for its waits
        self._hooks, self._sync, self._recorded = [], True, None
        self._steps, self._reported, self._inline = 0, (0.0, 0.0), BusyTime()

    # --- setup -------------------------------------------------------------------
    def attach(self, model, optimizer, scheduler) -> None:
        super().attach(model, optimizer, scheduler)
        broadcast_module(self.world.comm, model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if self.world.size == 1 or not self.params:
            self.world.log.info("gradient sync: a single rank, nothing to communicate")
            return
        device = self.params[0].device
        rank = low_rank(self.cfg.sync.compression)
        if rank is not None:
            self.powersgd = PowerSGD(rank, self.cfg.sync.powersgd_start, self.world.size)
        self.reducer = self._make_reducer(device)
        if self.cfg.sync.bucket_mb > 0:
            self._start_engine()
        self.world.log.info(f"gradient sync: {self.describe()}")

    def _make_reducer(self, device: torch.device) -> Reducer:
        codec = Codec("none" if self.powersgd else self.cfg.sync.compression, self.world.size)
        ring = uses_ring(self.cfg.sync.cross_node, self.world.num_nodes)
        if self.cfg.sync.hierarchical:
            collective = HierarchicalAllreduce(self.world.comm, self.world.local_comm, ring)
        elif (self.cfg.sync.shared_memory == "auto" and self.world.local_size > 1
              and self.world.even_nodes and device.type == "cpu"
              and (codec.wire_dtype is None or self.world.num_nodes > 1)
              and self.cfg.sync.bucket_mb > 0
              and self.params[0].dtype in (torch.float32, torch.float64)):
            # windows within each node; across nodes each rank's slice goes through MPI, and
            # only there is it compressed (on one node nothing crosses a network: a
            # compressed run keeps the flat collective it asked to compress)
            collective = SharedMemoryAllreduce(self.world.local_comm, self.world.comm, ring)
        else:
            collective = FlatAllreduce(self.world.comm, ring)
        # agreed: a refused --cuda-aware on ends every rank with one line, never a crash
        aware, self._buffers_why = self.world.agree(lambda: choose_path(
            self.cfg.sync.cuda_aware, device.type, cuda_aware_override(), probe_cuda_support))
        if aware and (codec.wire_dtype is not None or self.params[0].dtype in HALF_DTYPES):
            aware = False      # MPI would call the Python sum operation on device pointers
            self._buffers_why += "; but 2-byte floats are summed by a host-side MPI operation"
        return Reducer(collective, codec, device, aware)

    def _start_engine(self) -> None:
        from mpi4py import MPI

        level = MPI.Query_thread()
        self.runner = make_runner(level, MPI.THREAD_MULTIPLE)
        if not self.runner.overlaps:
            self.world.log.warning(
                f"warning: the MPI library provides thread level {level}, not "
                f"MPI_THREAD_MULTIPLE ({MPI.THREAD_MULTIPLE}); gradients are reduced after "
                f"backward, without overlap")
        if self.cfg.sync.overlap_forward:
            if self.runner.overlaps:
                self.late = self._make_reducer(self.params[0].device)
                self.deferred = DeferredUpdate(self.model, self.optimizer, self._wait_thread,
                                               self._watch_landing)
            else:
                self.world.log.warning("warning: --overlap-forward needs MPI_THREAD_MULTIPLE; "
                                       "updates land after each exchange instead")
        self.factors = self._factored_layers()
        order = list(reversed(range(len(self.params))))   # autograd runs roughly backwards
        self._recorded = []
        self._build(self._plan(order))
        self._hooks = [p.register_post_accumulate_grad_hook(partial(self._grad_ready, i))
                       for i, p in enumerate(self.params)]

    def _factored_layers(self) -> dict:
        """``--sufficient-factors``: the fully connected weights that travel as factors."""
        setting, device = self.cfg.sync.sufficient_factors, self.params[0].device
        if setting == "on" and device.type != "cpu":
            raise MpicnnError("--sufficient-factors on: CPU ranks only so far (use auto or off "
                              "on GPUs)", collective=True)
        if setting == "off" or device.type != "cpu" or (
                setting == "auto" and self.world.num_nodes == 1):
            return {}
        gain = AUTO_BYTES_GAIN if setting == "auto" else 1
        index = {id(p): i for i, p in enumerate(self.params)}
        wire = self.reducer.codec.wire_dtype
        node = self.world.local_comm.allgather(self.world.rank)
        return {index[id(module.weight)]: FactorExchange(
                    self.world.comm, FactorCapture(module), node,
                    self.cfg.training.batch_size, wire or module.weight.dtype)
                for module in self.model.modules()
                if worth_factoring(module, self.world.size, self.cfg.training.batch_size, gain)
                and id(module.weight) in index}

    def _plan(self, order: list[int]) -> list[list[int]]:
        return bucket_plan(self.params, order, int(self.cfg.sync.bucket_mb * MB),
                           alone=self.factors.keys())

    def _build(self, plan: list[list[int]]) -> None:
        old = self.buckets
        self.buckets = build_buckets(self.params, plan, [
            self._channel(i, len(plan)).collective.allocate for i in range(len(plan))])
        for bucket in old:                 # after the new views took over their values
            self._channel(bucket.index, len(old)).collective.release(bucket.flat)
        if self.powersgd is not None:
            self.powersgd.regroup(plan, [p.numel() for p in self.params])
        self._bucket_of = [None] * len(self.params)
        for bucket in self.buckets:
            for i in bucket.members:
                self._bucket_of[i] = bucket
        self._reset()

    def _factors_of(self, members: list[int]):
        """The FactorExchange of a bucket that holds one factored weight, else None."""
        return self.factors.get(members[0]) if len(members) == 1 else None

    def _job(self, bucket, reducer: Reducer):
        """What averages ``bucket``: its factors' exchange, or ``reducer`` on its flat."""
        exchange = self._factors_of(bucket.members)
        if exchange is not None:
            return partial(exchange, bucket.flat, reducer.collective)
        return self._average_job(bucket.index, bucket.members, bucket.flat, reducer,
                                 reducer.ready_event())

    def _average_job(self, key, members, flat, reducer: Reducer, ready):
        """What averages ``flat``, the gradients of ``members``: PowerSGD's exchange once it
        compresses, else ``reducer`` (``key``: its scratch buffers)."""
        if self.powersgd is not None and self.powersgd.compressing:
            return self.powersgd.job(tuple(members), flat, self._shapes(members), reducer,
                                     ready)
        return partial(reducer, key, flat, ready)

    def _shapes(self, members) -> list:
        return [self.params[i].shape for i in members]

    def _channel(self, index: int, count: int) -> Reducer:
        """The reducer of bucket ``index`` of ``count``: the late channel for the last one."""
        return self.late if self.late is not None and index == count - 1 else self.reducer

    def _wait_thread(self) -> None:
        for done in self.runner.wait():
            Reducer.consume(done)

    def _reset(self) -> None:
        for bucket in self.buckets:
            bucket.reset()
        self._ready = [False] * len(self.buckets)
        self._next = 0

    def describe(self) -> str:
        """One line for the startup log: path, buckets, thread, collective, precision, buffers."""
        reducer = self.reducer
        codec = reducer.codec
        if self.powersgd is not None:
            precision = self.powersgd.describe(self._shapes(
                [i for i in range(len(self.params)) if i not in self.factors]))
            if self.factors:
                precision += "; the layers sent as factors stay exact"
        elif codec.wire_dtype is None:
            precision = "full precision, divided after the sum"
        elif isinstance(reducer.collective, SharedMemoryAllreduce):
            precision = (f"{codec.name} across nodes (exact sums within each node), divided "
                         f"before the cast")
        else:
            precision = f"{codec.name} on the wire, divided before the sum"
        buffers = ""
        if reducer.device.type == "cuda":
            how = ("staged through pinned host memory" if reducer.buffers.staged
                   else "to MPI directly")
            buffers = f"; CUDA buffers {how}: {self._buffers_why}"
        if not self.buckets:
            path = "plain: one blocking Allreduce of all gradients after backward"
        else:
            if not self.runner.overlaps:
                thread = "the main thread after backward, not overlapped"
            elif len(self.buckets) == 1:
                thread = "the main thread after backward (one bucket: nothing to overlap)"
            else:
                thread = "a communication thread, overlapped with backward"
            first = min(FIRST_BUCKET_BYTES / MB, self.cfg.sync.bucket_mb)
            path = (f"{len(self.buckets)} bucket(s) of {self._sizes()} MB (cap "
                    f"{self.cfg.sync.bucket_mb:g} MB, first {first:g} MB), reduced on {thread}")
            if self.deferred is not None and len(self.buckets) > 1:
                path += (", and on into the next forward: each layer's update lands as its "
                         "forward begins (--overlap-forward)")
            elif self.deferred is not None:
                path += "; --overlap-forward has nothing to defer"
            if self.factors:
                layers = ", ".join(e.describe() for e in self.factors.values())
                path += (f"; fully connected {layers} sent as the batch's factors (Allgather), "
                         f"the sum rebuilt on every rank (--sufficient-factors)")
        return f"{path}; {reducer.collective.describe()}; {precision}{buffers}"

    def _sizes(self) -> str:
        return "[" + ", ".join(f"{b.nbytes / MB:.2f}" for b in self.buckets) + "]"

    # --- the step ----------------------------------------------------------------
    def zero_grad(self) -> None:
        self._land()
        if not self.buckets:
            return super().zero_grad()
        for bucket in self.buckets:
            if not bucket.bound():         # someone set .grad to None or a new tensor
                bucket.bind()
            bucket.flat.zero_()

    @contextmanager
    def no_sync(self):
        self._sync = False
        try:
            yield
        finally:
            self._sync = True

    def _grad_ready(self, index: int, _param) -> None:
        if not self._sync:
            return
        if self._recorded is not None:
            self._recorded.append(index)
        bucket = self._bucket_of[index]
        bucket.pending -= 1
        if bucket.pending == 0:
            self._ready[bucket.index] = True
            # The last bucket completes as backward ends: after_backward reduces it itself,
            # sparing two thread handoffs when the main thread would only wait.
            while self._next < len(self.buckets) - 1 and self._ready[self._next]:
                self._launch(self.buckets[self._next])

    def _launch(self, bucket) -> None:
        self._next += 1
        self.runner.submit(self._job(bucket, self.reducer))

    def after_backward(self, finalize=None) -> None:
        self._average()
        if finalize is not None:          # on the average: the same on every rank
            finalize(self.settled_params())

    def _average(self) -> None:
        if self.reducer is None:
            return
        self._steps += 1
        if not self.buckets:
            return self._plain_allreduce()
        if self.deferred is not None and self._recorded is None:
            return self._average_deferred()
        self._wait_thread()
        # What is left (the last bucket, buckets of unused parameters) runs here, in bucket
        # order after everything the thread did, so all ranks issue the same sequence.
        with self._inline.timing():
            for bucket in self.buckets[self._next:]:
                reducer = self._channel(bucket.index, len(self.buckets))
                Reducer.consume(self._job(bucket, reducer)())
        self._reset()
        self._step_done()
        if self._recorded is not None:
            self._rebuild(self._recorded)

    def _average_deferred(self) -> None:
        """Average the last bucket now on its own channel; leave the others in flight."""
        last = self.buckets[-1]
        for bucket in self.buckets[self._next:-1]:    # unused parameters: zeros, in order
            self._launch(bucket)
        with self._inline.timing():
            Reducer.consume(self._job(last, self.late)())
        self.deferred.hold([p for bucket in self.buckets[:-1] for p in bucket.params])
        self._reset()
        self._step_done()

    def _step_done(self) -> None:
        """Every bucket of this step has its job: count the step (PowerSGD's start)."""
        if self.powersgd is not None:
            self.powersgd.step_done()

    def settled_params(self) -> list:
        """The parameters whose averaged gradient is in ``.grad`` now (``finalize``'s)."""
        if self.deferred is None or not self.deferred.pending:
            return self.params
        return [p for p in self.params if id(p) not in self.deferred.pending_ids]

    def _land(self) -> None:
        if self.deferred is not None:
            self.deferred.land()

    def step(self, found_inf=None) -> None:
        if self.deferred is None:
            return super().step(found_inf)
        self.deferred.step(partial(super().step, found_inf))

    def skip_step(self) -> None:
        if self.deferred is not None:
            self.deferred.drop()
        super().skip_step()

    def evaluate(self, model, loader, precision=None) -> tuple[float, float]:
        self._land()
        return super().evaluate(model, loader, precision)

    def watched_by(self, guard) -> None:
        """With --overlap-forward the next forward waits for the last exchange: marked so."""
        super().watched_by(guard)
        self._watch_landing = guard.waiting_at_last_exchange

    def _rebuild(self, recorded: list[int]) -> None:
        """Re-bucket in the order gradients became ready on rank 0 (values kept)."""
        self._recorded = None
        order = list(dict.fromkeys(self.world.comm.bcast(recorded, root=0)))
        seen = set(order)
        order += [i for b in self.buckets for i in b.members if i not in seen]   # unused
        plan = self._plan(order)
        if not same_plan(plan, [b.members for b in self.buckets]):
            self._build(plan)
            self.world.log.info(f"gradient sync: buckets rebuilt in the order gradients became "
                                f"ready: {self._sizes()} MB")

    def _plain_allreduce(self) -> None:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params]
        flat = flatten(grads)
        # written on the current stream: the reducer's stream must wait before reading it
        job = self._average_job(PLAIN_KEY, range(len(self.params)), flat, self.reducer,
                                self.reducer.ready_event())
        Reducer.consume(job())
        self._step_done()
        unflatten_into(flat, grads)

    def sync_buffers(self) -> None:
        self._land()
        average_buffers(self.world.comm, self.model)

    def timings_ms(self) -> dict:
        """Mean milliseconds per step the reductions ran (hidden or not) since the last call,
        and the CPU time of the threads that ran them."""
        if self.runner is None:
            return {}
        busy = (self.runner.busy.wall + self._inline.wall, self.runner.busy.cpu + self._inline.cpu)
        steps, self._steps = self._steps, 0
        wall, cpu = (1000 * (now - before) / max(1, steps)
                     for now, before in zip(busy, self._reported))
        self._reported = busy
        timings = {"comm_busy_ms": round(wall, 3), "comm_cpu_ms": round(cpu, 3)}
        if self.deferred is not None:     # the wait moved into the next forward
            waited, self.deferred.wait_seconds = self.deferred.wait_seconds, 0.0
            timings["comm_in_forward_ms"] = round(1000 * waited / max(1, steps), 3)
        return timings

    def finish(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if self.runner is not None:
            if self.deferred is not None and self.deferred.pending:
                return                     # failed mid-step: the in-flight exchange may hang
            if not self.runner.idle:       # failed mid-step: a collective may never return
                return
            self.runner.close()
            self.runner = None
        if self.deferred is not None:
            self.deferred.close()
            self.deferred = None
        for exchange in self.factors.values():
            exchange.close()
        self.factors = {}
        if self.reducer is not None:
            for bucket in self.buckets:    # .grad must outlive the (shared) bucket memory
                bucket.detach()
            self.buckets = []
            for reducer in (self.reducer, self.late):
                if reducer is not None:
                    reducer.collective.free()
                    reducer.codec.close()
            self.reducer = self.late = None
