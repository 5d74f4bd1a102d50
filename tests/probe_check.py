"""Run under mpirun: rank 0 prints every rank's CUDA-support probe answer, one JSON line."""
import json

from mpicnn.sync.allreduce.transport import probe_cuda_support

if __name__ == "__main__":
    from mpi4py import MPI

    answers = MPI.COMM_WORLD.gather(list(probe_cuda_support()), root=0)
    if answers is not None:
        print(json.dumps(answers), flush=True)
