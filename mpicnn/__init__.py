"""mpicnn: data-parallel CNN training over MPI."""

__version__ = "0.1.0"
