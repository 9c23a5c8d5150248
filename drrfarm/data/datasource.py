"""The Ray Datasource of :func:`~drrfarm.data.read_drrs` (imports Ray: loaded by ``read_drrs`` when it runs)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from drrfarm.data.shards import ReadUnit, ShardReader


class DrrShardDatasource(Datasource):
    """Committed drrfarm shards as Ray Data blocks, decoded in the read tasks (see
    :func:`~drrfarm.data.plan_read_tasks`). Ray pushes ``Dataset.filter(expr=...)`` predicates down into it: rows
    are dropped before decoding."""

    def __init__(self, tasks: Sequence[tuple[ReadUnit, ...]], filesystem: Any, columns: Sequence[str],
                 float_line_integral: bool, arrow_filter: Any, empty_image: tuple[str, int, int] | None,
                 decoded_bytes_per_stored: float) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.filesystem = filesystem
        self.columns = list(columns)
        self.float_line_integral = float_line_integral
        self.arrow_filter = arrow_filter
        self.empty_image = empty_image
        self.scale = decoded_bytes_per_stored

    def get_name(self) -> str:
        return "DrrShards"

    def estimate_inmemory_data_size(self) -> int | None:
        return int(sum(u.nbytes for t in self.tasks for u in t) * self.scale)

    def supports_predicate_pushdown(self) -> bool:
        return True

    def _filter(self) -> Any:
        pushed = self.get_current_predicate()
        if pushed is None:
            return self.arrow_filter
        pushed = pushed.to_pyarrow()
        return pushed if self.arrow_filter is None else self.arrow_filter & pushed

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[Any]:
        flt = self._filter()
        out = []
        for units in self.tasks:
            reader = ShardReader(units, self.filesystem, self.columns, self.float_line_integral, flt, self.empty_image)
            meta = BlockMetadata(num_rows=None if flt is not None else sum(u.rows for u in units),
                                 size_bytes=int(sum(u.nbytes for u in units) * self.scale),
                                 input_files=[u.path for u in units], exec_stats=None)
            out.append(ReadTask(reader, meta, per_task_row_limit=per_task_row_limit))
        return out
