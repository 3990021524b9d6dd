import logging

import pytest
import torch


@pytest.fixture(autouse=True)
def torchtitan_log_records_reach_caplog():
    """``init_logger`` (any trainer a test built) turns off propagation of the project's
    logger, after which ``caplog`` sees none of its records: each test starts with it on."""
    logger = logging.getLogger("torchtitan")
    before = logger.propagate
    logger.propagate = True
    yield
    logger.propagate = before


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
