"""One logger for the whole project, configured once per process.

Only the rank named by LOG_RANK-style filtering prints; torchrun's ``--local-ranks-filter``
does that outside the process, so here every rank logs and the launcher chooses.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("torchtitan")


def init_logger(level: int = logging.INFO) -> None:
    """Attach one stream handler with a rank-aware prefix (idempotent)."""
    logger.setLevel(level)
    logger.propagate = False
    if logger.handlers:
        return
    rank = os.environ.get("RANK")
    prefix = f"[rank{rank}]" if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter(f"{prefix}[titan] %(asctime)s - %(levelname)s - %(message)s")
    )
    logger.addHandler(handler)


_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)
