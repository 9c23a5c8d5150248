"""Row filters: dict filters checked against the schema, as pyarrow expressions, manifest pruning, row masks.

A filter (:data:`FilterSpec`) is a dict ``{"volume_id": [...], "kvp": [...], ...}`` (AND over columns of
``value in list``), a Ray Data expression (or expression string) or a ``pyarrow.compute.Expression``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from drrfarm.data.columns import IMAGE
from drrfarm.errors import StorageError

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

    from drrfarm.sinks.manifest import Manifest, ShardEntry

FilterSpec = Any  # Mapping[str, value | list of values] | ray.data.expressions.Expr | str | pyarrow.compute.Expression


def _as_list(v: Any) -> list[Any]:
    if isinstance(v, str | bytes) or not isinstance(v, Iterable):
        return [v]
    return list(v)


def check_filter_dict(flt: Mapping[str, Any], schema: pa.Schema) -> dict[str, list[Any]]:
    """A dict filter with its columns checked against the shards' schema and every value made a list."""
    out: dict[str, list[Any]] = {}
    for name, values in flt.items():
        if name not in schema.names or name == IMAGE:
            known = sorted(n for n in schema.names if n != IMAGE)
            raise StorageError(f"filter: unknown column {name!r}; columns: {known}")
        vals = _as_list(values)
        if not vals:
            raise StorageError(f"filter: empty list of values for {name!r}")
        out[str(name)] = vals
    return out


def arrow_expression(flt: Mapping[str, list[Any]]) -> Any:
    """pyarrow.compute.Expression for a dict filter: AND over columns of ``column in values``."""
    import pyarrow.compute as pc

    expr = None
    for name, vals in flt.items():
        term = pc.field(name).isin(vals)
        expr = term if expr is None else expr & term
    return expr


def is_arrow_expression(obj: Any) -> bool:
    """Whether ``obj`` is a ``pyarrow.compute.Expression``."""
    try:
        import pyarrow.compute as pc
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, pc.Expression)


def prune_entries(manifest: Manifest, flts: Sequence[Mapping[str, list[Any]]]) -> list[ShardEntry]:
    """Manifest entries that can hold rows passing every dict filter on ``volume_id`` / ``shard_id`` (others
    skipped: their files are never opened)."""
    entries = list(manifest.values())
    for flt in flts:
        if "volume_id" in flt:
            want = {str(v) for v in flt["volume_id"]}
            entries = [e for e in entries if not e.volume_ids or want.intersection(e.volume_ids)]
        if "shard_id" in flt:
            shards = {str(v) for v in flt["shard_id"]}
            entries = [e for e in entries if e.shard_id in shards]
    return entries


def reader_filters(flt: FilterSpec | None, volume_ids: Iterable[str] | None,
                   schema: pa.Schema) -> tuple[list[dict[str, list[Any]]], Any]:
    """The filter of a plain-pyarrow reader (a dict or a ``pyarrow.compute.Expression``; the torch datasets,
    :func:`~drrfarm.data.read_metadata`) and its ``volume_ids``, as (the dict filters, to prune the manifest
    with; their AND with the expression as one pyarrow expression, None to keep every row)."""
    dict_filters: list[dict[str, list[Any]]] = []
    arrow_filter = None
    if isinstance(flt, Mapping):
        dict_filters.append(check_filter_dict(flt, schema))
    elif flt is not None:
        if not is_arrow_expression(flt):
            raise StorageError("filter: the torch datasets take a dict or a pyarrow.compute.Expression")
        arrow_filter = flt
    if volume_ids is not None:
        dict_filters.append({"volume_id": [str(v) for v in volume_ids]})
    for d in dict_filters:
        e = arrow_expression(d)
        arrow_filter = e if arrow_filter is None else arrow_filter & e
    return dict_filters, arrow_filter


def to_arrow_filter(flt: Any) -> Any:
    """A Ray Data expression (or expression string) as a pyarrow expression; None if it has no such form."""
    try:
        if isinstance(flt, str):
            from ray.data._internal.planner.plan_expression.expression_evaluator import ExpressionEvaluator

            flt = ExpressionEvaluator.parse_native_expression(flt)
        return flt.to_pyarrow()
    except Exception:  # noqa: BLE001 - left to Dataset.filter (Ray's own evaluation, after decoding)
        return None


def filter_mask(table: Any, expr: Any) -> np.ndarray:
    """Boolean row mask of ``table.filter(expr)`` (expression evaluated on the table)."""
    import pyarrow as pa

    idx = pa.table({"__row": pa.array(np.arange(table.num_rows))})
    for name in table.column_names:
        idx = idx.append_column(name, table.column(name))
    kept = np.asarray(idx.filter(expr).column("__row").to_numpy(zero_copy_only=False), np.int64)
    mask = np.zeros(table.num_rows, bool)
    mask[kept] = True
    return mask
