"""PowerSGD: each bucket's matrices averaged as rank-r factors, with error feedback.

Vogels, Karimireddy and Jaggi, "PowerSGD: Practical Low-Rank Gradient Compression for
Distributed Optimization" (2019), with the semantics of PyTorch DDP's ``powerSGD_hook``
and ``PowerSGDState`` (torch 2.x), so that on the same gradients the two give the same
result to float rounding:

* the first ``start`` steps average buckets whole (the engine's ordinary reduction);
* then, per bucket: the last step's residual is added to the gradient (error feedback);
  each tensor viewed as a matrix ``n x m`` (its first dimension by the rest) travels as
  ``P = M Q`` (n x r) and ``Q = M^T P`` (m x r) when ``(n + m) r x min_compression_rate <
  n m``; vectors and small matrices travel whole;
* ``Q`` keeps last step's value (warm start) and is orthogonalised; a bucket's first
  ``Q`` is drawn from a normal distribution seeded, in bucket order, from
  ``numpy.random.RandomState(0)``, as DDP draws it, so every rank draws the same;
* ``P`` is summed and orthogonalised (Gram-Schmidt up to rank 2, else QR), ``Q`` summed and
  divided by the rank count, and the bucket becomes ``P Q^T``; the residual is what this
  rank put in minus what came out.

The tensors that travel whole go in the same Allreduce as ``P``: two collectives a
bucket where DDP issues three, with the same sums. Both go through the bucket's
reducer (its collective: flat, hierarchical, or the windows' flat fallback; its buffer
path on CUDA). A column of zeros (a gradient that is zero everywhere) stays zero where
DDP's epsilon-free orthogonalisation would divide 0 by 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch

from ...cluster.errors import MpicnnError
from .scratch import reusable

NAME = "powersgd"
DEFAULT_RANK = 1                 # DDP's PowerSGDState defaults
MIN_COMPRESSION_RATE = 2
SEED = 0
SEED_RANGE = 1_000_000_000


def low_rank(spec: str) -> int | None:
    """The rank of a ``powersgd[:RANK]`` compression spec; None for any other spec."""
    name, colon, rank = spec.partition(":")
    if name != NAME:
        return None
    if not colon:
        return DEFAULT_RANK
    if not rank.isdigit() or int(rank) < 1:
        raise MpicnnError(f"--compression {spec}: the rank after 'powersgd:' must be a whole "
                          f"number >= 1, e.g. powersgd:2", collective=True)
    return int(rank)


def matrix_shape(shape) -> tuple[int, int] | None:
    """The (rows, columns) a tensor of ``shape`` is compressed as (None: a scalar)."""
    if len(shape) == 0:
        return None
    rows = shape[0]
    return rows, (shape.numel() // rows if rows else 0)


def worth_compressing(rows: int, cols: int, rank: int, min_rate: float) -> bool:
    """Whether rank-``rank`` factors are ``min_rate`` times smaller than the matrix (DDP's rule)."""
    return (rows + cols) * min(rows, cols, rank) * min_rate < rows * cols


@dataclass
class Layout:
    """Where a bucket's tensors lie in its flat buffer and how each travels."""

    whole: list = field(default_factory=list)      # (offset, numel), in bucket order
    matrices: list = field(default_factory=list)   # (offset, rows, cols, rank), DDP's order
    whole_numel: int = 0
    p_numel: int = 0
    q_numel: int = 0


def layout_of(shapes, rank: int, min_rate: float = MIN_COMPRESSION_RATE) -> Layout:
    """The layout of a bucket of tensors of ``shapes`` (in flat order).

    The compressed ones come grouped by shape in order of first appearance, as DDP orders
    its P and Q memory and its random draws.
    """
    layout, groups, offset = Layout(), {}, 0
    for shape in map(torch.Size, shapes):
        numel, matrix = shape.numel(), matrix_shape(shape)
        if matrix is not None and worth_compressing(*matrix, rank, min_rate):
            groups.setdefault(matrix, []).append(offset)
        else:
            layout.whole.append((offset, numel))
            layout.whole_numel += numel
        offset += numel
    for (rows, cols), offsets in groups.items():
        r = min(rows, cols, rank)
        layout.matrices += [(o, rows, cols, r) for o in offsets]
        layout.p_numel += len(offsets) * rows * r
        layout.q_numel += len(offsets) * cols * r
    return layout


def wire_fraction(shapes, rank: int, min_rate: float = MIN_COMPRESSION_RATE) -> float:
    """The values that cross the wire per gradient value (all of ``shapes``, one bucket)."""
    layout = layout_of(shapes, rank, min_rate)
    total = sum(torch.Size(s).numel() for s in shapes)
    return (layout.whole_numel + layout.p_numel + layout.q_numel) / max(1, total)


def orthogonalize(matrices: torch.Tensor, epsilon: float = 0.0) -> None:
    """Orthonormalise the columns of each matrix of a batch in place (DDP's choice of method)."""
    rank = matrices.shape[2]
    if rank <= 2 or matrices.dtype in (torch.float16, torch.bfloat16):
        _gram_schmidt(matrices, epsilon)
        return
    torch.linalg.qr(matrices, out=(matrices, torch.empty(
        matrices.shape[0], rank, rank, device=matrices.device, dtype=matrices.dtype)))


def _gram_schmidt(matrices: torch.Tensor, epsilon: float) -> None:
    columns = matrices.shape[2]
    for i in range(columns):
        col = matrices[:, :, i: i + 1]
        norm = torch.norm(col, dim=1, keepdim=True)
        if epsilon == 0:
            # where the norm is 0 the column is 0: dividing by 1 keeps it 0, not NaN
            col /= torch.where(norm > 0, norm, torch.ones_like(norm))
        else:
            col /= norm + epsilon
        if i + 1 < columns:
            rest = matrices[:, :, i + 1:]
            rest -= torch.sum(col * rest, dim=1, keepdim=True) * col


@dataclass
class BucketState:
    """What PowerSGD keeps of one bucket between steps."""

    layout: Layout | None = None
    error: torch.Tensor | None = None    # last step's residual, in the bucket's flat layout
    q: torch.Tensor | None = None        # every matrix's Q, back to back (warm start)
    scratch: dict = field(default_factory=dict)


class PowerSGD:
    """PowerSGD's state for every bucket, and the exchange that averages one.

    Buckets are keyed by their members (parameter indices in flat order). Decisions that
    must agree across ranks (whether this step compresses, the seed of a new ``Q``) are
    made when a bucket's job is made, on the thread that launches buckets in bucket
    order, so it does not matter which thread or channel then runs the job.
    """

    def __init__(self, rank: int, start: int, ranks: int, *,
                 min_compression_rate: float = MIN_COMPRESSION_RATE,
                 error_feedback: bool = True, warm_start: bool = True,
                 epsilon: float = 0.0, seed: int = SEED):
        import numpy as np

        self.rank, self.start, self.ranks = rank, start, ranks
        self.min_rate, self.error_feedback, self.warm_start = \
            min_compression_rate, error_feedback, warm_start
        self.epsilon = epsilon
        self.steps = 0                   # steps averaged so far (DDP's state.iter)
        self._rng = np.random.RandomState(seed)
        self._states: dict[tuple, BucketState] = {}
        self._seeded: set[tuple] = set()     # buckets whose Q exists (or is being made)

    @property
    def compressing(self) -> bool:
        """Whether this step's buckets travel as factors (else whole)."""
        return self.steps >= self.start

    def step_done(self) -> None:
        """Count a step whose every bucket has been handed to its job."""
        self.steps += 1

    def job(self, key: tuple, flat: torch.Tensor, shapes, reducer, ready=None):
        """The call that replaces bucket ``key``'s ``flat`` by its PowerSGD average.

        ``shapes``: its tensors' shapes in flat order; ``reducer`` sums the factors over
        ranks and runs the work on its stream after ``ready`` (see ``Reducer.run``).
        """
        seed = None
        if not self.warm_start or key not in self._seeded:
            seed = int(self._rng.randint(SEED_RANGE))
            self._seeded.add(key)
        work = partial(self.exchange, key, flat, shapes, reducer.sum, seed)
        return partial(reducer.run, work, ready)

    def exchange(self, key: tuple, flat: torch.Tensor, shapes, total, seed=None) -> None:
        """Average ``flat`` in place; ``total(name, tensor)`` sums a tensor over ranks.

        ``seed``: draw a new ``Q`` from it (a bucket's first step, or every step without
        warm start); None: reuse the last one.
        """
        state = self._states.setdefault(key, BucketState())
        if state.layout is None:
            state.layout = layout_of(shapes, self.rank, self.min_rate)
        layout = state.layout
        kept = None
        if self.error_feedback:
            if state.error is None:
                state.error = torch.zeros_like(flat)
            else:
                flat.add_(state.error)
            kept = reusable(state.scratch, "input", flat.numel(), flat.dtype, flat.device)
            kept.copy_(flat)
        # the tensors that travel whole, then P: one Allreduce
        low = reusable(state.scratch, "low", layout.whole_numel + layout.p_numel, flat.dtype,
                       flat.device)
        if seed is not None:
            state.q = torch.empty(layout.q_numel, dtype=flat.dtype, device=flat.device)
        matrices, ps, qs = self._views(layout, flat, low, state.q)
        self._orthogonal_qs(qs, seed)
        for m, q, p in zip(matrices, qs, ps):
            torch.bmm(m, q, out=p)
        whole = low[: layout.whole_numel]
        pieces = whole.split([numel for _, numel in layout.whole])
        for (offset, numel), piece in zip(layout.whole, pieces):
            piece.copy_(flat[offset: offset + numel])
        total((key, "low"), low)
        whole.div_(self.ranks)
        for (offset, numel), piece in zip(layout.whole, pieces):
            flat[offset: offset + numel].copy_(piece)
        # P needs no division: it is orthogonalised
        for p in ps:
            orthogonalize(p, self.epsilon)
        for m, p, q in zip(matrices, ps, qs):
            torch.bmm(m.transpose(1, 2), p, out=q)
        if layout.q_numel:
            total((key, "q"), state.q)
            state.q.div_(self.ranks)
        for p, q, m in zip(ps, qs, matrices):
            torch.bmm(p, q.transpose(1, 2), out=m)
        if self.error_feedback:
            torch.sub(kept, flat, out=state.error)
        if not self.warm_start:
            state.q = None

    def _orthogonal_qs(self, qs, seed) -> None:
        """Orthogonalise last step's Qs, or new ones drawn from ``seed``."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        for q in qs:
            if generator is not None:    # drawn on the CPU, as DDP does: every device alike
                q.copy_(torch.randn(q.shape, generator=generator, dtype=q.dtype))
            orthogonalize(q, self.epsilon)

    @staticmethod
    def _views(layout: Layout, flat, low, q_memory):
        """(matrices of ``flat``, their Ps in ``low`` after the whole tensors, their Qs),
        each a batch of one as DDP shapes them."""
        matrices, ps, qs = [], [], []
        p_at, q_at = layout.whole_numel, 0
        for offset, rows, cols, r in layout.matrices:
            matrices.append(flat[offset: offset + rows * cols].view(1, rows, cols))
            ps.append(low[p_at: p_at + rows * r].view(1, rows, r))
            qs.append(q_memory[q_at: q_at + cols * r].view(1, cols, r))
            p_at, q_at = p_at + rows * r, q_at + cols * r
        return matrices, ps, qs

    def regroup(self, plan, numel) -> None:
        """Follow a new bucket plan (lists of parameter indices); ``numel[i]``: sizes.

        A bucket that kept its members keeps its state. Every parameter's residual moves
        into its new bucket (error feedback loses nothing); a changed bucket draws a new Q.
        """
        residual = {}
        for key, state in self._states.items():
            if state.error is not None:
                residual.update(zip(key, state.error.split([numel[i] for i in key])))
        states = {}
        for members in map(tuple, plan):
            if members in self._states:
                states[members] = self._states[members]
                continue
            pieces = [residual.get(i) for i in members]
            known = next((p for p in pieces if p is not None), None)
            if known is not None:
                states[members] = BucketState(error=torch.cat([
                    p if p is not None else known.new_zeros(numel[i])
                    for i, p in zip(members, pieces)]))
        self._states = states
        self._seeded = {key for key in self._seeded if key in states}

    def describe(self, shapes) -> str:
        """One phrase for the startup line: rank, start, and what travels."""
        layout = layout_of(shapes, self.rank, self.min_rate)
        share = wire_fraction(shapes, self.rank, self.min_rate)
        before = " (full precision before)" if self.start else ""
        return (f"PowerSGD rank {self.rank} from step {self.start}{before}, as DDP's "
                f"powerSGD_hook: error feedback, warm start, {len(layout.matrices)} of "
                f"{len(shapes)} tensors as factors P, Q (two Allreduces a bucket), "
                f"{100 * share:.1f}% of the gradient's values on the wire")
