import os

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter (on tiny shapes); must be set before Triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
