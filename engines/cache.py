"""See and trim the engine cache.

    python -m engines.cache list [--cache-dir DIR]
    python -m engines.cache prune [--older-than 30d] [--max-size 20G] [--dry-run] [--cache-dir DIR]
    python -m engines.cache verify [--cache-dir DIR]

`list` prints one line per artifact (backend, graph, size, last used) and the
temporary folders of builds that died. `prune` removes those leftovers, artifacts not
used for `--older-than`, then the least recently used until the cache fits
`--max-size`; an artifact being built right now is skipped. Without either flag it
removes leftovers only. `verify` hashes every artifact in full (a lookup hashes only
files changed since they last matched, runtime/integrity.py) and removes damaged ones,
which the next run rebuilds; exit 1 when it found any. Every build also keeps the
cache under $SDRT_CACHE_MAX_SIZE (default 50G; 0 turns it off), never removing what
was used in the last hour.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from runtime import cache, cache_prune
from runtime.args import OneLineParser, usage_error


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _ago(t: float) -> str:
    s = max(0.0, time.time() - t)
    return f"{s / 86400:.1f} d ago" if s >= 86400 else f"{s / 3600:.1f} h ago"


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(prog="python -m engines.cache", description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("list", "prune", "verify"))
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help=f"default ${cache.CACHE_ENV} or ~/.cache/sdrt/engines")
    ap.add_argument("--older-than", default=None, help="prune: unused for longer, e.g. 30d, 12h")
    ap.add_argument("--max-size", default=None, help="prune: down to this size, e.g. 20G")
    ap.add_argument("--dry-run", action="store_true", help="prune: say what would go")
    args = ap.parse_args(argv)
    root = args.cache_dir or cache.default_dir()
    try:
        older = None if args.older_than is None else cache_prune.parse_age(args.older_than)
        size = None if args.max_size is None else cache_prune.parse_size(args.max_size)
    except ValueError as e:
        return usage_error(str(e))
    if args.action != "prune" and (older is not None or size is not None or args.dry_run):
        return usage_error("--older-than, --max-size and --dry-run go with prune")
    if not root.exists():
        print(f"engine cache {root}: empty (no folder)")
        return 0
    if not root.is_dir():
        return usage_error(f"{root} is not a folder")
    try:
        if args.action == "list":
            items = cache_prune.artifacts(root)
            for a in items:
                note = "" if a.valid else "  (no valid sidecar)"
                print(f"{a.backend:9} {a.graph:15} {_human(a.size):>9}  used {_ago(a.last_used)}"
                      f"  {a.folder.name}{note}")
            left = cache_prune.leftovers(root)
            for folder, n in left:
                print(f"{'leftover':9} {'':15} {_human(n):>9}  {folder} (a process that died)")
            total = sum(a.size for a in items) + sum(n for _, n in left)
            print(f"engine cache {root}: {len(items)} artifacts, {_human(total)}")
            return 0
        if args.action == "verify":
            return _verify(root)
        gone = cache_prune.prune(root, older_than=older, max_size=size, dry_run=args.dry_run)
    except OSError as e:
        print(f"engines.cache: {e}", file=sys.stderr)
        return 1
    verb = "would remove" if args.dry_run else "removed"
    for folder, n, why in gone:
        print(f"{verb} {folder} ({_human(n)}): {why}")
    print(f"engine cache {root}: {verb} {len(gone)} folders, {_human(sum(n for _, n, _ in gone))}")
    return 0


def _verify(root: Path) -> int:
    damaged = 0
    items = cache_prune.artifacts(root)
    for a in items:
        side = cache._read_sidecar(a.folder)
        problem = "no valid sidecar" if side is None else None
        if side is not None:
            try:
                key = cache.CacheKey(**side["key"])
            except TypeError:
                key, problem = None, "no valid sidecar"
            if key is not None and cache.artifact_dir(key, root) != a.folder:
                problem = "its sidecar's key names another folder"
            elif key is not None:
                _, problem = cache.find(key, root, full=True)
        if problem:
            damaged += 1
            gone = cache_prune._remove(a.folder)
            print(f"damaged: {a.folder}: {problem}; "
                  + ("removed (the next run rebuilds it)" if gone else "in use, not removed"))
    print(f"engine cache {root}: {len(items)} artifacts hashed, {damaged} damaged")
    return 1 if damaged else 0


if __name__ == "__main__":
    sys.exit(main())
