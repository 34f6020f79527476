"""zdist status / zdist-status: the workers of a running cluster, as a table or as JSON.

    $ zdist status 127.0.0.1:8787
    Center 127.0.0.1:8787 · 2 workers · dashboard http://127.0.0.1:8790/
    ADDRESS          NAME      CORES  KEYS  BYTES    IN MEMORY  ON DISK  MEMORY     LIMIT  RUNNING  DONE  RESTARTS  STATUS   LAST SEEN
    127.0.0.1:40113  worker-0      1    10  1.2 KiB    1.2 KiB      0 B  71.3 MiB       -        0    10         0  running  0.2 s ago
    ...
    TOTAL            2 workers     2    20  2.4 KiB    2.4 KiB      0 B  142.6 MiB               0    20         0

Exits 1, saying so, when the Center does not answer within ``--timeout`` seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from zdist.summary import summarize

from .common import add_version, program


#: Seconds to wait for the Center by default.
DEFAULT_TIMEOUT = 5.0


def human_bytes(n: Any) -> str:
    """``1536`` → ``'1.5 KiB'``; ``None`` → ``'-'``."""
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} PiB"  # pragma: no cover - the loop returns at TiB


def human_age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s ago"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min ago"
    return f"{seconds / 3600:.1f} h ago"


async def fetch_info(address: str, timeout: float, security: Any = None) -> dict:
    from zdist.rpc import rpc

    async with rpc(address, timeout=timeout, security=security) as center:
        return await center.info()


def format_table(summary: dict) -> str:
    """A plain-text table for a terminal."""
    header = ["ADDRESS", "NAME", "CORES", "KEYS", "BYTES", "IN MEMORY", "ON DISK", "MEMORY", "LIMIT", "RUNNING", "DONE", "RESTARTS", "STATUS", "LAST SEEN"]
    right = set(range(2, 12)) | {13}
    rows = [
        [
            w["address"],
            w["name"],
            str(w["ncores"]),
            str(w["nkeys"]),
            human_bytes(w["nbytes"]),
            human_bytes(w["bytes_in_memory"]),
            human_bytes(w["bytes_on_disk"]),
            human_bytes(w["memory"]),
            human_bytes(w["memory_limit"]),
            str(w["executing"]),
            str(w["tasks_done"]),
            str(w["restarts"]),
            str(w["status"]),
            human_age(w["last_seen_age"]),
        ]
        for w in summary["workers"]
    ]
    t = summary["totals"]
    total = [
        "TOTAL",
        f"{t['workers']} worker{'s' if t['workers'] != 1 else ''}",
        str(t["ncores"]),
        str(t["nkeys"]),
        human_bytes(t["nbytes"]),
        human_bytes(t["bytes_in_memory"]),
        human_bytes(t["bytes_on_disk"]),
        human_bytes(t["memory"]),
        "",
        str(t["executing"]),
        str(t["tasks_done"]),
        str(t["restarts"]),
        "",
        "",
    ]
    table = [header, *rows, total]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]

    def line(row: list[str]) -> str:
        cells = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        return "  ".join(cells).rstrip()

    title = f"Center {summary['center']} · {t['workers']} worker{'s' if t['workers'] != 1 else ''} · {t['ncores']} cores"
    if summary.get("dashboard"):
        title += f" · dashboard {summary['dashboard']}"
    out = [title, line(header)]
    out += [line(row) for row in rows]
    if not rows:
        out.append("(no workers registered)")
    out.append(line(total))
    out += [f"{w['name']}: {w['spill_error']}" for w in summary["workers"] if w["spill_error"]]  # a full disk, and what to do
    return "\n".join(out)


def build_parser(prog: str = "zdist-status") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Show the workers of a running zdist cluster and its totals.")
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("center", metavar="CENTER_ADDRESS", help="the Center's HOST:PORT, e.g. 127.0.0.1:8787")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS", help=f"give up when the Center does not answer within this long (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--key", default=None, metavar="FILE", help="secret key file, for a cluster that uses CURVE (see zdist-keys)")
    parser.add_argument("--authorized-keys", default=None, metavar="DIR", help="directory of the public keys to trust (default: the key file's directory)")
    add_version(parser)


def run(args: argparse.Namespace, prog: str = "zdist-status") -> int:
    security = None
    if args.key:
        from zdist.security import Security

        security = Security(key=args.key, authorized_keys=args.authorized_keys)
    try:
        info = asyncio.run(asyncio.wait_for(fetch_info(args.center, args.timeout, security), args.timeout + 1))
    except (TimeoutError, asyncio.TimeoutError):
        hint = "" if args.key else "; if the cluster uses CURVE keys, give this program the secret key file: --key ~/.zdist/zdist.key_secret (a CURVE Center does not answer a client without the key)"
        print(f"{prog}: the Center at {args.center} did not answer within {args.timeout:g} s; is it running, and is the address right?{hint}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"{prog}: cannot ask the Center at {args.center}: {exc}", file=sys.stderr)
        return 1
    summary = summarize(info)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(format_table(summary))
    return 0


@program
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
