"""Provenance with MLflow, one sweep = one run: :mod:`~drrfarm.tracking.tracker` (the run's client,
:func:`~drrfarm.tracking.tracker.open_tracker`), :mod:`~drrfarm.tracking.store` (which MLflow store),
:mod:`~drrfarm.tracking.params` (params and metrics as MLflow takes them),
:mod:`~drrfarm.tracking.environment` (the driver's versions and GPUs as tags) and
:mod:`~drrfarm.tracking.redaction` (credentials kept out of everything logged). ``mlflow`` is imported
lazily, only when tracking is enabled."""
