"""``opswitch backends``: what can run here, what cannot and why, and op coverage."""

from __future__ import annotations

import argparse
import json
import sys

from opswitch.core.errors import BackendError
from opswitch.core.ops import OP_NAMES
from opswitch.core.probing import BackendStatus
from opswitch.core.registry import get_registry


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("backends", help="list compute backends, their devices and op coverage")
    p.add_argument("--ops", action="store_true", help="add the op coverage matrix (native vs fallback)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def _row(status: BackendStatus) -> dict:
    return {
        "name": status.name,
        "available": status.probe.available,
        "priority": status.priority,
        "device": status.probe.device,
        "reason": status.probe.reason,
        "source": status.source,
        "description": status.description,
        "native_ops": list(status.native_ops),
        "fallback_ops": list(status.fallback_ops),
        "per_sequence_ops": ["attention_batch"] if _per_sequence(status) else [],
        "dtypes": list(status.dtypes),
        "devices": list(status.devices),
        "weight_formats": list(status.weight_formats),
        "thread_safe": status.thread_safe,
    }


def _per_sequence(status: BackendStatus) -> bool:
    """attention_batch driven one sequence at a time through the backend's attention."""
    return "attention" in status.native_ops and "attention_batch" not in status.native_ops


def _coverage(status: BackendStatus, op: str) -> str:
    if op in status.native_ops:
        return "native"
    return "per sequence" if op == "attention_batch" and _per_sequence(status) else "fallback"


def _auto_choice(registry) -> tuple[str | None, str]:
    try:
        selection = registry.select("auto")
    except BackendError as exc:
        return None, str(exc)
    return selection.backend.spec, selection.reason


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for r in rows:
        cells = [c.ljust(w) for c, w in zip(r, widths)] + [r[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    registry = get_registry()
    statuses = registry.statuses()
    broken = registry.broken
    auto, why = _auto_choice(registry)
    if args.json:
        payload = {
            "backends": [_row(s) for s in statuses],
            "broken_plugins": [{"name": b.name, "source": b.source, "error": b.error} for b in broken],
            "auto": auto,
            "auto_reason": why,
            "ops": list(OP_NAMES),
        }
        json.dump(payload, sys.stdout, indent=2)
        print()
        return 0
    rows = [["NAME", "AVAILABLE", "PRIORITY", "DTYPES", "WEIGHTS", "SOURCE", "DEVICE / REASON"]]
    for s in statuses:
        detail = s.probe.device if s.probe.available else s.probe.reason
        rows.append([s.name, "yes" if s.probe.available else "no", str(s.priority), ",".join(s.dtypes),
                     ",".join(s.weight_formats), s.source, detail])
    print(_table(rows))
    devices = [d for s in statuses for d in s.devices if not d.endswith(" host CPU")]
    if devices:
        print("\ndevices (name them as NAME:N):")
        for device in devices:
            print(f"  {device}")
    for b in broken:
        print(f"{b.name}  BROKEN  ({b.source}): {b.error}")
    print()
    print(f"auto -> {why}" if auto else f"auto -> nothing available: {why}")
    if args.ops:
        print()
        ops_rows = [["OP", *[s.name for s in statuses]]]
        for op in OP_NAMES:
            ops_rows.append([op, *[_coverage(s, op) for s in statuses]])
        print(_table(ops_rows))
        print("\nfallback = computed by the numpy reference on the host, copied to and from the backend;"
              " per sequence = a batch is attended one sequence at a time through the backend's attention")
    return 0
