"""Run under mpirun: the allreduce strategy's startup CUDA-buffer decision, probe injected.

``argv`` are mpicnn.train flags. The MPI library is made to answer "not CUDA-aware", and
the real decision path (``_make_reducer`` on a CUDA device, inside ``run_guarded``) runs
without a GPU: a forced CUDA-aware path must end every rank with one error line, before
any device buffer could reach MPI.
"""
import sys

import torch

from mpicnn.cluster.world import run_guarded
from mpicnn.config import parse_config
from mpicnn.sync.allreduce import strategy


def main(world, argv):
    strategy.probe_cuda_support = lambda: (False, "MPIX_Query_cuda_support() = 0")
    chooser = strategy.AllreduceStrategy(world, parse_config(argv))
    chooser.params = [torch.zeros(4)]
    chooser._make_reducer(torch.device("cuda"))
    print(f"rank {world.rank}: chose {chooser._buffers_why}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main, sys.argv[1:]))
