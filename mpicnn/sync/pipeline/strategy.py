"""``--mode pipeline``: the model cut into K stages, R replicas of each averaging gradients.

Every rank builds the whole model (so checkpoints load and save as ordinary state dicts)
and computes only its stage, a slice of the model's sequential form. The replicas of a
stage average its gradients with mpicnn's allreduce engine on their own communicator
(buckets, overlap, compression as in ``--mode allreduce``). All stages of one pipeline
read the same batches: the first feeds the images in, the last computes the loss from the
labels, and every stage knows the micro-batch sizes without a message.
"""
from __future__ import annotations

import dataclasses
import math
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from ...cluster.errors import MpicnnError
from ...cluster.world import reduce_sums
from ...data.loader import EVAL_BATCH
from ...observe import timeline
from ...resilience.nan_policy import nonfinite_flag
from ...training.models import sequential_form
from ..allreduce.strategy import AllreduceStrategy
from ..contract import Strategy
from ..replicas import average_buffers
from . import partition
from .grid import Grid, check_grid, check_settings
from .memory import ActivationMeter
from .schedule import SCHEDULES, ideal_bubble
from .transport import BACKWARD, EVAL, FORWARD, Transport

GATHER_TAG = 21
MB = 2 ** 20


def replica_world(world, comm, grid: Grid):
    """``world`` as the replicas of this rank's stage see it (for the allreduce engine)."""
    local = world.local_comm.Split(color=grid.stage, key=world.rank)
    sizes = comm.allgather(local.Get_size())
    return dataclasses.replace(world, comm=comm, rank=comm.Get_rank(), size=comm.Get_size(),
                               local_comm=local, local_rank=local.Get_rank(),
                               local_size=local.Get_size(), even_nodes=len(set(sizes)) == 1)


class PipelineStrategy(Strategy):
    """One stage of one pipeline replica: micro-batch schedule, replica allreduce."""

    name = "pipeline"

    def __init__(self, world, cfg):
        super().__init__(world, cfg)
        check_grid(cfg.sync.stages, world.size)
        check_settings(cfg)
        self.grid = grid = Grid(world.size, cfg.sync.stages, world.rank)
        self.pipe_comm = world.comm.Split(color=grid.replica, key=grid.stage)
        self.replica_comm = world.comm.Split(color=grid.stage, key=grid.replica)
        self.sub = AllreduceStrategy(replica_world(world, self.replica_comm, grid), cfg)
        self.input_shape = None
        self.layers, self.cuts, self.stage_module, self.transport = [], [], None, None
        self.peer_wait = nullcontext        # the stall watch's mark for waits on neighbours
        self._compute = self._wall = 0.0
        self._steps = 0

    # --- the grid ------------------------------------------------------------------
    @property
    def workers(self) -> int:
        return self.grid.replicas

    @property
    def worker_index(self) -> int:
        return self.grid.replica

    def expect_samples(self, input_shape) -> None:
        self.input_shape = tuple(input_shape)

    # --- setup -------------------------------------------------------------------
    def attach(self, model, optimizer, scheduler) -> None:
        super().attach(model, optimizer, scheduler)
        if self.input_shape is None:
            raise MpicnnError("pipeline: the sample shape is unknown (expect_samples was not "
                              "called before attach)", collective=True)
        cfg, grid = self.cfg, self.grid
        self.layers = self.world.agree(lambda: self._sequential(model))
        n, stages = len(self.layers), grid.stages
        rows = math.ceil(cfg.training.batch_size / cfg.sync.micro_batches)
        cuts = partition.parse_split(cfg.sync.split)
        if stages > n:
            partition.check_cuts([], stages, n)          # one line: more stages than layers
        if cuts:
            partition.check_cuts(cuts, stages, n)
            costs, how = partition.param_bytes(self.layers), "--split"
        elif cfg.sync.balance == "params":
            costs, how = partition.param_bytes(self.layers), "parameter bytes"
        else:
            device = next(model.parameters()).device
            costs = self.world.comm.bcast(
                partition.measure_times(self.layers, self.input_shape, rows, device)
                if self.world.is_root else None, root=0)
            how = f"forward+backward time at {rows} samples"
        self.cuts = cuts or partition.balanced_cuts(costs, stages)
        self.costs, self.balance_how = costs, how
        first, end = partition.bounds(self.cuts, n)[grid.stage]
        self.stage_module = nn.Sequential(*self.layers[first:end])
        self._clone_input = bool(getattr(self.layers[first], "inplace", False))
        shapes = partition.activation_shapes(self.layers, self.input_shape)
        dtype = next(model.parameters()).dtype
        self.transport = Transport(self.pipe_comm, grid.stage, stages, shapes[first],
                                   shapes[end], rows, EVAL_BATCH, dtype,
                                   next(model.parameters()).device, self.peer_wait)
        self.meter = ActivationMeter(model.parameters())
        self.world.log.info(self.describe())
        self.sub.attach(self.stage_module, optimizer, scheduler)

    def _sequential(self, model) -> list:
        layers = sequential_form(model, self.cfg.training.model)
        probe = torch.randn(2, *self.input_shape, generator=torch.Generator().manual_seed(0))
        probe = probe.to(next(model.parameters()).device)
        was = model.training
        model.eval()
        with torch.no_grad():
            whole, x = model(probe), probe
            for layer in layers:
                x = layer(x)
        model.train(was)
        if x.shape != whole.shape or not torch.allclose(x, whole, rtol=1e-4, atol=1e-5):
            raise MpicnnError(f"model {self.cfg.training.model!r}: its sequential form does "
                              f"not compute what its forward does, so it cannot be cut into "
                              f"stages", collective=True)
        return layers

    def describe(self) -> str:
        """The startup line: grid, schedule, cut points and what each stage costs."""
        g, s = self.grid, self.cfg.sync
        sums = partition.stage_sums(self.costs, self.cuts)
        mean = sum(sums) / len(sums) if sums else 0.0
        params = partition.stage_sums(partition.param_bytes(self.layers), self.cuts)
        unit = (lambda v: f"{1000 * v:.2f} ms") if "time" in self.balance_how \
            else (lambda v: f"{v / MB:.2f} MB")
        stages = "; ".join(
            f"stage {k}: layers {a}-{b - 1}, {unit(c)}, {p / MB:.2f} MB params"
            for k, ((a, b), c, p) in enumerate(zip(partition.bounds(self.cuts, len(self.layers)),
                                                   sums, params)))
        return (f"pipeline: {g.stages} stages x {g.replicas} replicas (replica-major: a "
                f"pipeline's stages are consecutive ranks), {s.pipeline_schedule}, "
                f"{s.micro_batches} micro-batch(es); {len(self.layers)} layers cut at "
                f"{self.cuts} by {self.balance_how}, slowest stage "
                f"{max(sums) / mean if mean else 1:.2f} x the mean; {stages}")

    # --- the step ----------------------------------------------------------------
    def forward_backward(self, model, stats, images, labels, accum_steps: int = 1,
                         label_smoothing: float = 0.0, weight: float = 1.0, precision=None):
        """Run this stage's part of the schedule for one batch; (loss sum, samples counted).

        The loss sum stays on the device (zero on stages other than the last). ``precision``
        is unused: ``check_settings`` admits only ``--amp off`` without clipping.
        """
        g, t, m = self.grid, self.transport, self.cfg.sync.micro_batches
        start, wait0 = time.perf_counter(), t.wait_seconds
        xs, ys = images.tensor_split(m), labels.tensor_split(m)
        live = [i for i in range(m) if len(ys[i])]
        ops = [(op, i) for op, i in SCHEDULES[self.cfg.sync.pipeline_schedule](m, g.stages,
                                                                               g.stage)
               if len(ys[i])]
        last_backward = max((k for k, (op, _) in enumerate(ops) if op == "B"), default=-1)
        self.sub.zero_grad()
        if not g.first:
            t.expect(FORWARD, [len(ys[i]) for i in live])
        if not g.last:
            t.expect(BACKWARD, [len(ys[i]) for i in live])
        saved, loss_sum = {}, torch.zeros((), device=labels.device)
        for k, (op, i) in enumerate(ops):
            if op == "F":
                with stats.phase("forward"):
                    if g.first:
                        x = xs[i]
                    else:
                        with timeline.span("pipe_wait"):
                            x = t.take(FORWARD).requires_grad_()
                    with self.meter.forward():
                        out = self.stage_module(x.clone() if self._clone_input and not g.first
                                                else x)
                        if g.last:
                            loss = F.cross_entropy(out, ys[i], label_smoothing=label_smoothing)
                            out = loss * (weight * len(ys[i]) / len(labels))
                    if g.last:
                        loss_sum = loss_sum + loss.detach() * len(ys[i])
                    else:
                        t.send(out, FORWARD)
                    saved[i] = (x, out)
            else:
                with stats.phase("backward"):
                    x, out = saved.pop(i)
                    with self.sub.no_sync() if k != last_backward else nullcontext():
                        if g.last:
                            out.backward()
                        else:
                            with timeline.span("pipe_wait"):
                                grad = t.take(BACKWARD)
                            if out.requires_grad:  # a first stage without parameters: none
                                out.backward(grad)
                    if not g.first:
                        t.send(x.grad, BACKWARD)
            t.progress()
        with timeline.span("pipe_wait"):
            t.flush()
        wall = time.perf_counter() - start
        self._wall += wall
        self._compute += wall - (t.wait_seconds - wait0)
        self._steps += 1
        return loss_sum, (len(labels) if g.last else 0)

    def zero_grad(self) -> None:
        self.sub.zero_grad()

    def no_sync(self):
        return self.sub.no_sync()

    def after_backward(self, finalize=None) -> None:
        """Average the stage's gradients over its replicas; agree on finiteness over all.

        Each stage sees only its own gradients, so the verdict of ``finalize`` (or of the
        plain check) is made every rank's: the NaN policy then skips or stops on all ranks
        alike. ``finalize`` keeps its verdict as the tensor it returns, which is set here.
        """
        self.sub.after_backward()
        params = list(self.stage_module.parameters())
        if finalize is not None:
            found = finalize(params)
        else:
            found = nonfinite_flag([p.grad for p in params if p.grad is not None],
                                   self.transport.device)
        # one host read and world allreduce a step (the stages' verdicts differ otherwise)
        found.fill_(float(reduce_sums(self.world.comm, [float(found)])[0] > 0))

    @property
    def skips_on_device(self) -> bool:
        # The verdict is read on the host each step anyway; and rank 0's optimizer holds the
        # other stages' state after a gather, so the base rule would differ between ranks.
        return False

    def step(self, found_inf=None) -> None:
        self.sub.step()

    def skip_step(self) -> None:
        self.sub.skip_step()

    # --- evaluation, buffers, checkpoints ---------------------------------------------
    @torch.no_grad()
    def evaluate(self, model, loader, precision=None) -> tuple[float, float]:
        """(loss, accuracy) of the pipelined model over the whole split (last stages count)."""
        g, t = self.grid, self.transport
        model.eval()
        loss_sum = correct = count = 0.0
        for images, labels in loader.eval_batches():
            if not len(labels):
                continue
            x = images if g.first else t.receive(EVAL, len(labels))
            out = self.stage_module(x)
            if g.last:
                loss_sum += F.cross_entropy(out, labels, reduction="sum").item()
                correct += (out.argmax(1) == labels).sum().item()
                count += len(labels)
            else:
                t.send(out, EVAL)
        t.flush()
        loss_sum, correct, count = reduce_sums(self.world.comm, [loss_sum, correct, count])
        return loss_sum / count, correct / count

    def sync_buffers(self) -> None:
        """Average the stage's buffers over replicas; gather every stage on rank 0.

        Rank 0 then holds the whole model and optimizer state, so its checkpoint is an
        ordinary one (it resumes in ``--mode allreduce`` as well).
        """
        average_buffers(self.replica_comm, self.stage_module)
        g, bounds = self.grid, partition.bounds(self.cuts, len(self.layers))
        if g.replica == 0 and not g.first:
            params = list(self.stage_module.parameters())
            states = [{k: v.detach().cpu() if torch.is_tensor(v) else v
                       for k, v in self.optimizer.state.get(p, {}).items()} for p in params]
            tensors = [v.detach().cpu() for v in self.stage_module.state_dict().values()]
            self.world.comm.send((tensors, states), dest=0, tag=GATHER_TAG)
        elif self.world.is_root:
            for stage in range(1, g.stages):
                tensors, states = self.world.comm.recv(source=g.rank_of(stage, 0),
                                                       tag=GATHER_TAG)
                a, b = bounds[stage]
                module = nn.Sequential(*self.layers[a:b])
                for dst, src in zip(module.state_dict().values(), tensors):
                    dst.copy_(src)
                for p, state in zip(module.parameters(), states):
                    if state:
                        self.optimizer.state[p] = {
                            k: v.to(p.device) if torch.is_tensor(v) and v.dim() else v
                            for k, v in state.items()}

    def timings_ms(self) -> dict:
        """Per-stage compute and wait per step, and the measured bubble (collective)."""
        steps = max(1, self._steps)
        wall, compute = self._wall, self._compute
        row = [1000 * compute / steps, 1000 * (wall - compute) / steps,
               (wall - compute) / wall if wall else 0.0, self.meter.peak / MB,
               self.meter.micro / MB]
        self._wall = self._compute = 0.0
        self._steps = 0
        rows = self.world.comm.allgather(row)
        stages = self.grid.stages
        per_stage = [[sum(r[j] for r in rows[s::stages]) / len(rows[s::stages])
                      for s in range(stages)] for j in range(3)]
        memory = [[max(r[j] for r in rows[s::stages]) for s in range(stages)]
                  for j in (3, 4)]
        return {**self.sub.timings_ms(),
                "stage_compute_ms": [round(v, 3) for v in per_stage[0]],
                "stage_wait_ms": [round(v, 3) for v in per_stage[1]],
                "stage_bubble": [round(v, 4) for v in per_stage[2]],
                "bubble_ideal": round(ideal_bubble(self.cfg.sync.micro_batches, stages), 4),
                "stage_activation_peak_mb": [round(v, 6) for v in memory[0]],
                "stage_activation_micro_mb": [round(v, 6) for v in memory[1]]}

    def rank_labels(self) -> list[str]:
        grids = [Grid(self.grid.size, self.grid.stages, r) for r in range(self.grid.size)]
        return [f"stage {g.stage} of {g.stages}, replica {g.replica}" for g in grids]

    def watched_by(self, guard) -> None:
        """Stages wait for each other within a step: those waits are marked, so a stage
        stuck mid-step shows as the one its neighbours wait for."""
        super().watched_by(guard)
        self.peer_wait = guard.waiting_for_peer

    def report(self) -> dict:
        params = partition.stage_sums(partition.param_bytes(self.layers), self.cuts)
        return {"stages": self.grid.stages, "replicas": self.grid.replicas,
                "micro_batches": self.cfg.sync.micro_batches, "cuts": list(self.cuts),
                "stage_params_mb": [round(v / MB, 4) for v in params]}

    def finish(self) -> None:
        self.sub.finish()
        if self.transport is not None and self.transport.idle:
            self.transport = None
