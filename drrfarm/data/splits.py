"""Patient-level splits: volume (patient) ids assigned to training or validation, deterministically."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable

log = logging.getLogger("drrfarm.data")


def volume_split(volume_ids: Iterable[str], val_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split volume (patient) ids into (train ids, val ids), deterministically.

    Volumes are ranked by ``sha256(f"{seed}:{volume_id}")`` (independent of listing order and of
    Python's hash seed) and the first ``round(val_fraction * n)`` go to
    validation (at least one and at most ``n - 1`` when ``val_fraction > 0`` and ``n >= 2``). With a
    single volume everything is training data (a patient-level split needs two patients).
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    ids = sorted({str(v) for v in volume_ids})
    n_val = int(round(float(val_fraction) * len(ids)))
    if val_fraction > 0 and len(ids) >= 2:
        n_val = min(max(n_val, 1), len(ids) - 1)
    elif len(ids) < 2:
        n_val = 0
        if val_fraction > 0:
            log.warning("volume_split: %d volume(s); no patient-level validation split possible", len(ids))
    ranked = sorted(ids, key=lambda v: hashlib.sha256(f"{int(seed)}:{v}".encode()).hexdigest())
    return sorted(ranked[n_val:]), sorted(ranked[:n_val])
