"""CLI: ``drrfarm inspect URL [--contact-sheet out.png --n 16] [--verify] [--json]``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from drrfarm.errors import StorageError
from drrfarm.sinks.contact_sheet import contact_sheet_png
from drrfarm.sinks.manifest import read_manifest, verify_shard
from drrfarm.sinks.store import open_store


def add_commands(subparsers: Any) -> None:
    """Register ``inspect`` on the CLI's subparsers; the handler is ``args.handler(args) -> int``."""
    p = subparsers.add_parser(
        "inspect",
        help="summarise a written dataset (images, shards, columns, spec, provenance run)",
        description="Summarise the committed shards of a dataset written by drrfarm.",
    )
    p.add_argument("url", help="dataset URL or path (s3://bucket/prefix, /data/run1, ...)")
    p.add_argument("--contact-sheet", metavar="OUT.png", help="also write a contact sheet of sample images")
    p.add_argument("--n", type=int, default=16, help="images on the contact sheet (default 16)")
    p.add_argument("--verify", action="store_true", help="check every file's size and sha256")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=run_inspect)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def summarize(url: str, *, verify: bool = False) -> dict[str, Any]:
    """Summary dict of the dataset at ``url`` (what ``inspect`` prints)."""
    import pyarrow.parquet as pq

    store = open_store(url, probe=False)
    m = read_manifest(store)
    if not m:
        raise StorageError(f"{store.url}: no committed shards (no _manifest/ entries or manifest.json)")
    first = next(iter(m.values()))
    meta = dict(first.file_metadata)
    columns: list[str] = []
    pq_keys = m.keys_of("parquet")
    if pq_keys:
        with store.open_read(pq_keys[0]) as f:
            schema = pq.read_schema(f)
        columns = [f"{fld.name}:{fld.type}" for fld in schema]
        meta.update({k.decode(): v.decode() for k, v in (schema.metadata or {}).items()})
    extra = m.extra
    bad: list[str] = []
    if verify:
        bad = [sid for sid, e in m.items() if not verify_shard(store, e, checksums=True)]
    shapes = sorted({f"{e.height}x{e.width}" for e in m.values()})
    return {
        "url": store.url,
        "images": m.total_rows,
        "shards": len(m),
        "bytes": m.total_bytes,
        "formats": sorted({f for e in m.values() for f in e.formats}),
        "image_dtype": sorted({e.image_dtype for e in m.values()}),
        "image_shape": shapes,
        "volumes": sorted({v for e in m.values() for v in e.volume_ids}),
        "columns": columns,
        "spec_sha256": extra.get("spec_sha256") or meta.get("spec_sha256", ""),
        "drrfarm_version": meta.get("drrfarm_version", ""),
        "mlflow_run_id": extra.get("mlflow_run_id") or meta.get("mlflow_run_id", ""),
        "sweep_id": extra.get("sweep_id") or meta.get("sweep_id", ""),
        "finalized_at": m.finalized_at,
        "verify_failed": bad if verify else None,
    }


def run_inspect(args: argparse.Namespace) -> int:
    """Handler of ``drrfarm inspect``; DrrfarmError propagates to cli.main."""
    s = summarize(args.url, verify=args.verify)
    if args.contact_sheet:
        import fsspec

        png = contact_sheet_png(args.url, args.n)
        with fsspec.open(args.contact_sheet, "wb") as f:
            f.write(png)
        s["contact_sheet"] = args.contact_sheet
    if args.json:
        print(json.dumps(s, indent=1))
    else:
        out = sys.stdout
        print(f"dataset      {s['url']}", file=out)
        print(f"images       {s['images']} in {s['shards']} shard(s), {_human(s['bytes'])}, "
              f"formats: {', '.join(s['formats'])}", file=out)
        print(f"image        {', '.join(s['image_dtype'])} {', '.join(s['image_shape'])}", file=out)
        print(f"volumes      {len(s['volumes'])}: {', '.join(s['volumes'][:8])}"
              f"{' ...' if len(s['volumes']) > 8 else ''}", file=out)
        print(f"spec sha256  {s['spec_sha256'] or '-'}", file=out)
        print(f"sweep id     {s['sweep_id'] or '-'}", file=out)
        print(f"mlflow run   {s['mlflow_run_id'] or '-'}", file=out)
        print(f"drrfarm      {s['drrfarm_version'] or '-'}", file=out)
        print(f"manifest     {'finalized ' + s['finalized_at'] if s['finalized_at'] else 'not finalized'}",
              file=out)
        if s["columns"]:
            print(f"columns      {len(s['columns'])}: {', '.join(s['columns'])}", file=out)
        if s["verify_failed"] is not None:
            print(f"verify       {'OK' if not s['verify_failed'] else 'FAILED: ' + ', '.join(s['verify_failed'])}",
                  file=out)
        if args.contact_sheet:
            print(f"contact      {args.contact_sheet}", file=out)
    return 1 if s["verify_failed"] else 0
