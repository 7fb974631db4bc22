"""Where a Herald server spends its time while it acknowledges messages (one connection by default).

A fresh server is started (as in ack_throughput.py), ``py-spy record`` is
attached to its pid, ``mllp-load -c C`` (default 1) sends N messages, py-spy is stopped
(SIGINT, then SIGKILL after a bound) and its raw stack samples are summed:

* samples per thread (reactor, store writer, pipeline, thread pool);
* the functions seen most at the top of a stack (own time), and
* the functions seen most anywhere in a stack (inclusive time),

overall and per thread. By default a sample is counted when its thread is
running on a CPU (py-spy's idle filter); ``--gil`` counts only the thread that
holds the GIL, which shows who keeps the interpreter busy; ``--idle`` counts
waiting threads too.

py-spy is not a dependency of Herald: ``.venv/bin/pip install py-spy``.

Examples (from the repository root)::

    .venv/bin/python bench/profile_intake.py --pipeline off
    .venv/bin/python bench/profile_intake.py --pipeline on --gil
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ack_throughput import run_mllp_load, running_server  # noqa: E402

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]*?)(?::(?P<line>\d+))?\)$")


def py_spy_command() -> str:
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if not found:
        raise SystemExit("profile_intake: py-spy is not installed (.venv/bin/pip install py-spy)")
    return found


def thread_group(label: str) -> str:
    """``thread (123): PoolThread-twisted.internet.reactor-4`` -> ``PoolThread-twisted.internet.reactor``."""
    name = label.split(": ", 1)[1] if ": " in label else label
    return re.sub(r"-\d+$", "", name)


def frame_name(frame: str, line: bool = False) -> str:
    """``Writer._run (gateway/store/writer.py:331)`` -> ``Writer._run (gateway/store/writer.py)``,
    or with ``:331`` kept."""
    m = _FRAME.match(frame)
    if not m:
        return frame
    where = f"{m['file']}:{m['line']}" if line and m["line"] else m["file"]
    return f"{m['func']} ({where})"


def summarise(raw_path: Path, top: int) -> str:
    """Sum py-spy's raw (collapsed) stacks into per-thread shares and top functions."""
    by_thread: Counter = Counter()
    own: Counter = Counter()
    own_lines: Counter = Counter()
    inclusive: Counter = Counter()
    own_by_thread: dict[str, Counter] = defaultdict(Counter)
    total = 0
    for line in raw_path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        parts = stack.split(";")
        thread = thread_group(parts[0])
        frames = [frame_name(f) for f in parts[1:]] or ["(no Python frame)"]
        total += n
        by_thread[thread] += n
        own[frames[-1]] += n
        own_lines[frame_name(parts[-1], line=True) if len(parts) > 1 else frames[-1]] += n
        own_by_thread[thread][frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    if not total:
        return "no samples were recorded"
    out = [f"{total} samples"]
    out.append("\nsamples by thread:")
    for thread, n in by_thread.most_common():
        out.append(f"  {100 * n / total:5.1f}%  {thread}")
    out.append(f"\ntop {top} by own time (function at the top of the stack), all threads:")
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    out.append(f"\ntop {top} source lines by own time (a C call such as conn.execute is charged to its line):")
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own_lines.most_common(top)]
    out.append(f"\ntop {top} by inclusive time (function anywhere in the stack), all threads:")
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    for thread, _ in by_thread.most_common(4):
        out.append(f"\n{thread}: top {min(top, 10)} by own time (% of all samples)")
        out += [f"  {100 * k / total:5.1f}%  {f}" for f, k in own_by_thread[thread].most_common(min(top, 10))]
    return "\n".join(out)


def profile(args) -> tuple[dict, str]:
    """Run one profiled load; return mllp-load's result and the summary."""
    tmp = Path(tempfile.mkdtemp(prefix="herald-bench-profile-"))
    raw = tmp / "py-spy.raw"
    spy = None
    try:
        with running_server(args.server, args.pipeline == "on") as server:
            cmd = [py_spy_command(), "record", "--pid", str(server.proc.pid), "--rate", str(args.rate)]
            cmd += ["--format", "raw", "--output", str(raw), "--threads"]
            cmd += ["--duration", str(int(args.max_seconds) + 5)]
            if args.gil:
                cmd.append("--gil")
            if args.idle:
                cmd.append("--idle")
            if not args.blocking:
                cmd.append("--nonblocking")
            spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            load = run_mllp_load(server.port, args.n, args.c, args.max_seconds)
            if spy.poll() is None:
                os.kill(spy.pid, signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                _, err = spy.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(spy.pid, signal.SIGKILL)
                spy.wait(timeout=10)
                err = "py-spy did not stop within 30 s"
            if not raw.exists():
                raise SystemExit(f"profile_intake: py-spy wrote nothing: {err.strip()}")
        return load, summarise(raw, args.top)
    finally:
        if spy is not None and spy.poll() is None:
            os.kill(spy.pid, signal.SIGKILL)
            spy.wait(timeout=10)
        if args.keep:
            print(f"profile_intake: kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See bench/README.md.")
    ap.add_argument("-n", type=int, default=5000, help="messages to send (default 5000)")
    ap.add_argument("-c", type=int, default=1, help="connections (default 1)")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="bound on the mllp-load run (default 60)")
    ap.add_argument(
        "--pipeline",
        choices=["on", "off"],
        default="on",
        help="on (default): as deployed; off: intake only (instrumented server)",
    )
    ap.add_argument("--server", choices=["herald", "instrumented"], default="herald")
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second (default 250)")
    ap.add_argument("--gil", action="store_true", help="count only the thread holding the GIL")
    ap.add_argument("--idle", action="store_true", help="count idle (waiting) threads too")
    ap.add_argument("--blocking", action="store_true", help="pause the server for each sample (more exact, slower)")
    ap.add_argument("--top", type=int, default=20, help="functions to list (default 20)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder with py-spy's raw output")
    args = ap.parse_args(argv)
    if args.n < 1 or args.c < 1 or args.max_seconds <= 0 or args.rate < 1:
        ap.error("-n, --max-seconds and --rate must be positive")
    load, summary = profile(args)
    view = "GIL holder" if args.gil else ("all threads, idle included" if args.idle else "threads on a CPU")
    print(
        f"py-spy on the server, pipeline {args.pipeline}, mllp-load -c {args.c}: {load['answered']} messages, "
        f"{load['msgs_per_s']} msgs/s, ACK p50 {load['ack_ms_p50']} ms, p99 {load['ack_ms_p99']} ms "
        f"(while sampling at {args.rate} Hz)"
    )
    print(f"samples counted: {view}\n")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
