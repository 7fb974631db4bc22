"""Compare Herald revisions on ack_throughput.py, interleaved, on the same machine in the same run.

On a shared machine figures drift by tens of percent within minutes, so two
revisions are only comparable when their runs alternate: this script exports
each git revision (``git archive``) into a temporary folder, then for each
round runs ``bench/ack_throughput.py ARGS --json`` once per revision with
``PYTHONPATH`` pointing at that export (the order alternates between rounds),
and prints every row and the median per revision and connection count. The
benchmark scripts themselves are this checkout's.

    .venv/bin/python bench/compare.py ef6846b HEAD --rounds 3 -- --pipeline off -n1 5000 -n8 10000
    .venv/bin/python bench/compare.py ef6846b WORKTREE -- --server instrumented

``WORKTREE`` stands for this checkout as it is, uncommitted changes included.
Every run is bounded by ack_throughput.py's own limits; temporary folders are
deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def export(revision: str, into: Path) -> Path:
    """A folder whose gateway/ and mllp/ are ``revision``'s (this checkout for WORKTREE)."""
    if revision == "WORKTREE":
        return ROOT
    folder = into / revision.replace("/", "_")
    folder.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], capture_output=True, check=True, timeout=60)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True, timeout=60)
    return folder


def run(folder: Path, args: list[str]) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(folder)}
    cmd = [sys.executable, str(ROOT / "bench" / "ack_throughput.py"), *args, "--json"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode not in (0, 1) or not done.stdout.strip():
        raise RuntimeError(f"ack_throughput.py failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def line(label: str, r: dict) -> str:
    commits = r.get("commits")
    per = f"{r['answered'] / commits:.2f}" if commits else "n/a"
    return (
        f"{label:<14} c={r['connections']:<2} {r['answered']:>6} msgs {r['msgs_per_s']:>8.1f}/s "
        f"p50 {r['ack_ms_p50']:>6.2f} p99 {r['ack_ms_p99']:>6.2f} ms  msgs/commit {per:>5}  "
        f"server {r['server_cpu_us_per_msg']:>5.0f} workers {r['workers_cpu_us_per_msg']:>5.0f} "
        f"client {r['client_cpu_us_per_msg']:>4.0f} us/msg  unconverted {r['still_received']:>6}  "
        f"load {r['load_average'][0]:.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        split = argv.index("--")
        argv, passed = argv[:split], argv[split + 1 :]
    else:
        passed = []
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Arguments after -- go to ack_throughput.py."
    )
    ap.add_argument("revisions", nargs="+", help="git revisions (or WORKTREE) to compare")
    ap.add_argument("--rounds", type=int, default=2, help="rounds; each runs every revision once (default 2)")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    tmp = Path(tempfile.mkdtemp(prefix="herald-compare-"))
    try:
        folders = {rev: export(rev, tmp) for rev in args.revisions}
        rows: dict[tuple[str, int], list[dict]] = {}
        for i in range(args.rounds):
            order = args.revisions if i % 2 == 0 else list(reversed(args.revisions))
            for rev in order:
                for r in run(folders[rev], passed):
                    rows.setdefault((rev, r["connections"]), []).append(r)
                    print(line(f"{rev} #{i + 1}", r), flush=True)
        print(f"\nmedians over {args.rounds} rounds (ack_throughput.py {' '.join(passed)}):")
        for (rev, c), found in sorted(rows.items(), key=lambda kv: (kv[0][1], args.revisions.index(kv[0][0]))):
            med = {
                k: statistics.median(r[k] for r in found)
                for k in ("msgs_per_s", "ack_ms_p50", "ack_ms_p99", "server_cpu_us_per_msg", "workers_cpu_us_per_msg")
            }
            print(
                f"{rev:<14} c={c:<2} {med['msgs_per_s']:>8.1f} msgs/s  p50 {med['ack_ms_p50']:.2f}  "
                f"p99 {med['ack_ms_p99']:.2f} ms  server {med['server_cpu_us_per_msg']:.0f} us/msg  "
                f"workers {med['workers_cpu_us_per_msg']:.0f} us/msg"
            )
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
