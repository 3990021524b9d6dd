"""Fixtures the unit tests share."""

from __future__ import annotations

import pytest


@pytest.fixture
def pg():
    """A 1-rank process group, as the trainer always has."""
    import torch.distributed as dist

    from torchtitan.distributed.utils import destroy_process_group, init_single_process_group

    created = not dist.is_initialized()
    init_single_process_group("cpu")
    yield
    if created and dist.is_initialized():
        destroy_process_group()  # and DTensor's caches of its meshes
