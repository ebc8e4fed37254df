"""The benchmark scripts under simulations/ (each documents its command in its docstring) still load.

They are run by hand to produce the figures the docs quote, never by the suite: this checks
that each one imports and prints its ``--help`` (argparse), so a refactor cannot silently
break the command next to a published figure.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ("bench_baseline_scaling", "bench_device", "bench_fleet", "bench_popularity", "bench_record_dp",
              "bench_robust", "bench_rounds", "bench_threads", "diversity", "poisoning", "privacy_utility")
PROBE = """
import contextlib, io, runpy, sys
for name in sys.argv[1:]:
    sys.argv = [name, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_module(f"simulations.{name}", run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        assert stop.code in (0, None), (name, stop.code)
    assert out.getvalue().startswith("usage:"), (name, out.getvalue()[:200])
    print(name, "ok", flush=True)
"""


def test_every_benchmark_script_loads_and_documents_its_command():
    assert sorted(BENCHMARKS) == sorted(p.stem for p in (ROOT / "simulations").glob("*.py")
                                        if p.stem.startswith("bench_") or p.stem in ("diversity", "poisoning",
                                                                                      "privacy_utility"))
    for name in BENCHMARKS:
        assert "python -m simulations." + name in (ROOT / "simulations" / f"{name}.py").read_text(), name
    result = subprocess.run([sys.executable, "-c", PROBE, *BENCHMARKS], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.split() == [word for name in BENCHMARKS for word in (name, "ok")]
