"""HDF5 data: schema and validation, shard plan, reader; tools in ``python -m mpicnn.data``."""
