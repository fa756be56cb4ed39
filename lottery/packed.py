"""Packed training: the tickets of one rewind point trained side by side in one compiled step.

(Filled in below the pack size; see docs/packing.md.)
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("lottery")


def pack_size(cfg, pack: int | None, tickets: int) -> int:
    """How many tickets train side by side: ``pack`` (or ``LOTTERY_PACK``) when given, else from
    the accelerator's free memory; 1 on CPU and on any backend but JAX."""
    import keras

    if pack is None and os.environ.get("LOTTERY_PACK"):
        pack = int(os.environ["LOTTERY_PACK"])
    if pack is not None and pack < 1:
        raise ValueError(f"pack must be >= 1, got {pack}")
    if keras.backend.backend() != "jax":
        if pack and pack > 1:
            log.info("retrain: packing needs the JAX backend (this is %s): the tickets train one after another",
                     keras.backend.backend())
        return 1
    return min(tickets, pack or 1)
