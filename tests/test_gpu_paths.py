"""GPU paths tested on CPU where their decisions are pure: --cuda-aware refusal, PS servers
on the CPU, the PS worker's flat staging, the phase timer; GPU-marked twins run with CUDA."""
from __future__ import annotations

import pytest
import torch

from mpicnn.cluster.errors import MpicnnError
from mpicnn.sync.allreduce.transport import choose_path


# --- item 4: a forced CUDA-aware path with a library that cannot take device pointers --------
def test_cuda_aware_on_refused_when_the_library_says_no():
    no = lambda: (False, "MPIX_Query_cuda_support() = 0")      # noqa: E731
    with pytest.raises(MpicnnError) as err:
        choose_path("on", "cuda", None, no)
    assert err.value.collective and "not CUDA-aware" in str(err.value)
    assert "--cuda-aware auto or off" in str(err.value)
    with pytest.raises(MpicnnError, match="MPICNN_CUDA_AWARE=on"):
        choose_path("auto", "cuda", "on", no)
    assert choose_path("off", "cuda", None, no)[0] is False
    assert choose_path("auto", "cuda", None, no)[0] is False         # auto stages instead
    assert choose_path("on", "cpu", None, no)[0] is False            # host memory: no question
    aware, why = choose_path("on", "cuda", None, lambda: (True, "query = 1"))
    assert aware and "query = 1" in why
