"""Benchmark: on-device top-K latency, memory and export size at MovieLens-1M scale.

What a phone pays to show one user its recommendations: one recommendation call through
the Python path (:func:`client.recommend.recommend`) and through the exported TorchScript
module (:mod:`client.export`), both on ONE thread, as a phone app sharing its cores with
the UI would run it, and ``fedrec recommend --state-dir`` as a device's operator runs it
(the CLI, the stored rows and the last global model). Each (model, path) is measured in a fresh subprocess so its peak
resident memory (``getrusage(RUSAGE_SELF).ru_maxrss``) is its own; the TorchScript
subprocess imports nothing but torch, like a runtime that only has the exported file.
Models are randomly initialised (latency and memory do not depend on the values).

Targets: top-10 under 5 ms median for MF/GMF; device process under 300 MB RSS.

    python -m simulations.bench_device
    python -m simulations.bench_device --models gmf --calls 200 --items 20000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = ("mf", "gmf", "mlp", "neumf")
TARGET_MEDIAN_MS = 5.0  # MF/GMF top-10
TARGET_RSS_MB = 300.0


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _timings_ms(call, calls: int, warmup: int = 20) -> tuple[float, float]:
    """Median and 99th percentile of ``calls`` timed calls after a warm-up."""
    import numpy as np

    for _ in range(warmup):
        call()
    samples = np.empty(calls)
    for i in range(calls):
        started = time.perf_counter_ns()
        call()
        samples[i] = time.perf_counter_ns() - started
    return float(np.median(samples) / 1e6), float(np.percentile(samples, 99) / 1e6)


def _seen(num_items: int, count: int):
    import numpy as np

    return np.sort(np.random.default_rng(0).choice(num_items, size=count, replace=False))


def pytorch_worker(args: argparse.Namespace) -> dict:
    """Python path: build the device model from arrays, time ``recommend``, then export."""
    import torch

    from client.export import export_torchscript
    from client.recommend import device_model, recommend
    from common.models import ModelConfig, build_model

    torch.set_num_threads(1)
    config = ModelConfig(name=args.model, embedding_dim=args.dim, mlp_layers=tuple(args.mlp))
    server = build_model(config, 1, args.num_items, seed=0)  # one user: a phone
    shared, local = list(server.shared_state().values()), dict(server.local_state())
    shared_mb = sum(a.nbytes for a in shared) / 2**20
    del server
    seen = _seen(args.num_items, args.seen)
    started = time.perf_counter()
    model = device_model(config, shared, local)
    load_ms = (time.perf_counter() - started) * 1e3
    median, p99 = _timings_ms(lambda: recommend(model, 0, seen, args.k), args.calls)
    peak = _peak_mb()  # before exporting: scripting is not part of showing recommendations
    items, _ = recommend(model, 0, seen, args.k)
    export_torchscript(model, 0, args.export, seen_items=seen)
    write_state_dir(args, shared, local, seen)
    return {"model": args.model, "shared_mb": shared_mb, "load_ms": load_ms, "median_ms": median, "p99_ms": p99,
            "peak_mb": peak, "top": items.tolist()}  # fmt: skip


STATE_USER = 17  # the one user of the benchmark's device state (a global id)


def write_state_dir(args: argparse.Namespace, shared: list, local: dict, seen) -> None:
    """A phone's ``state-dir`` holding the same model and user, for the ``fedrec recommend --state-dir`` path."""
    from client import store
    from simulations.engine import fused_run_config

    overrides = {"model": args.model, "synthetic-items": args.num_items, "embedding-dim": args.dim,
                 "mlp-layers": ",".join(map(str, args.mlp))}
    state = store.DeviceState.empty(args.num_items).with_user(STATE_USER, seen)
    state = state.with_local_state({name: array for name, array in local.items()})
    state_dir = Path(args.export).with_suffix(".state")
    state_dir.mkdir(exist_ok=True)
    store.save(state_dir, state)
    store.save_global_model(state_dir, store.GlobalModel(fused_run_config(overrides), shared, 1))


def state_dir_worker(args: argparse.Namespace) -> dict:
    """`fedrec recommend --state-dir` as a device runs it: the CLI, the stored rows and global model."""
    import contextlib
    import io

    from simulations.cli import main as fedrec

    command = ["recommend", "--state-dir", str(Path(args.export).with_suffix(".state")), "--user", str(STATE_USER),
               "--k", str(args.k)]
    printed = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        code = fedrec(command)
    seconds = time.perf_counter() - started
    heavy = sorted({m.split(".")[0] for m in sys.modules} & {"opacus", "flwr", "ray"})
    top = [int(line.split("\t")[1]) for line in printed.getvalue().splitlines() if line.strip()]
    return {"code": code, "seconds": seconds, "peak_mb": _peak_mb(), "top": top, "heavy_imports": heavy}


def torchscript_worker(args: argparse.Namespace) -> dict:
    """Runtime path: only torch and the exported file (training items are baked in)."""
    import torch

    torch.set_num_threads(1)
    baseline = _peak_mb()  # the cost of importing torch at all
    started = time.perf_counter()
    module = torch.jit.load(args.export)
    load_ms = (time.perf_counter() - started) * 1e3
    extra = torch.empty(0, dtype=torch.long)
    with torch.inference_mode():
        median, p99 = _timings_ms(lambda: module(extra, args.k), args.calls)
        items, _ = module(extra, args.k)
    return {"load_ms": load_ms, "median_ms": median, "p99_ms": p99, "peak_mb": _peak_mb(), "torch_mb": baseline,
            "top": items.tolist(), "file_mb": os.path.getsize(args.export) / 2**20}  # fmt: skip


def run_worker(args: argparse.Namespace, model: str, path: str, export: Path) -> dict:
    command = [
        sys.executable, "-W", "ignore::DeprecationWarning", "-m", "simulations.bench_device", "--worker", path,
        "--model", model, "--export", str(export), "--items", str(args.items), "--dim", str(args.dim),
        "--mlp", *map(str, args.mlp), "--k", str(args.k), "--seen", str(args.seen), "--calls", str(args.calls),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{model}/{path} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(
        f"{args.items} items, dim {args.dim}, MLP {'-'.join(map(str, args.mlp))}, one user with {args.seen} seen items, "
        f"top-{args.k}, {args.calls} calls after 20 warm-up, 1 thread; load average {_load_average()} on {os.cpu_count()} CPUs\n"
    )
    print("| model | shared MB | PyTorch p50 ms | PyTorch p99 ms | TorchScript p50 ms | TorchScript p99 ms "
          "| same top-K | export MB | peak RSS PyTorch MB | peak RSS TorchScript MB | peak RSS `recommend --state-dir` MB "
          "| torch import MB | targets |")  # fmt: skip
    print("|---|--:|--:|--:|--:|--:|:-:|--:|--:|--:|--:|--:|---|")
    for r in rows:
        py, ts = r["pytorch"], r["torchscript"]
        misses = []
        if r["model"] in ("mf", "gmf") and max(py["median_ms"], ts["median_ms"]) >= TARGET_MEDIAN_MS:
            misses.append(f"median >= {TARGET_MEDIAN_MS:g} ms")
        cli = r["state_dir"]
        if max(py["peak_mb"], ts["peak_mb"], cli["peak_mb"]) >= TARGET_RSS_MB:
            misses.append(f"RSS >= {TARGET_RSS_MB:g} MB")
        same = py["top"] == ts["top"] == cli["top"]
        print(
            f"| {r['model']} | {py['shared_mb']:.2f} | {py['median_ms']:.3f} | {py['p99_ms']:.3f} | {ts['median_ms']:.3f} "
            f"| {ts['p99_ms']:.3f} | {'yes' if same else 'NO'} | {ts['file_mb']:.2f} | {py['peak_mb']:.0f} "
            f"| {ts['peak_mb']:.0f} | {cli['peak_mb']:.0f} | {ts['torch_mb']:.0f} "
            f"| {'met' if not misses else 'MISSED: ' + ', '.join(misses)} |"
        )
    heavy = sorted({name for r in rows for name in r["state_dir"]["heavy_imports"]})
    print(f"\nfedrec recommend --state-dir imported {', '.join(heavy) if heavy else 'neither Opacus nor Flower'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated model names")
    parser.add_argument("--items", type=int, default=3706, help="catalogue size (MovieLens-1M: 3706)")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--mlp", type=int, nargs="+", default=[64, 32, 16], help="MLP tower widths")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seen", type=int, default=165, help="items the user has seen (MovieLens-1M mean: 165)")
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--worker", choices=("pytorch", "torchscript", "state-dir"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--export", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.num_items = args.items
    if args.worker:
        work = {"pytorch": pytorch_worker, "torchscript": torchscript_worker, "state-dir": state_dir_worker}[args.worker]
        print(json.dumps(work(args)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            export = Path(tmp) / f"{model}.pt"
            rows.append({"model": model, "pytorch": run_worker(args, model, "pytorch", export),
                         "torchscript": run_worker(args, model, "torchscript", export),
                         "state_dir": run_worker(args, model, "state-dir", export)})  # fmt: skip
            print(f"  done {model}", file=sys.stderr, flush=True)
    print_table(rows, args)


if __name__ == "__main__":
    main()
