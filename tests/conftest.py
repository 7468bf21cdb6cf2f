"""Shared test setup.

The suite runs as two pytest-xdist workers on a 2-core machine: one torch thread per worker
avoids oversubscription, where every small op waits on a thread barrier with a busy peer core.
"""

import torch

torch.set_num_threads(1)
