"""The built wheel works on its own: ``fedrec simulate`` and ``flwr run .`` outside the source tree.

``python -m build`` makes the sdist and, from it, the wheel (hatchling, no build isolation:
it uses the ``build`` and ``hatchling`` of the dev extra). The wheel goes into a fresh
virtual environment (not editable, no source checkout on ``sys.path``); the dependencies,
already installed in the environment running the tests, are visible to it through a
``.pth`` file, so nothing is downloaded. Flower's console scripts (``flwr``,
``flower-superlink``, ``flwr-simulation`` ...) are written into the fresh environment's
``bin`` so that every process the SuperLink starts runs in it too.

Then, from a directory that is not the checkout:

- ``fedrec simulate --rounds 2`` on a tiny synthetic dataset, reading the defaults from the
  installed code (there is no ``pyproject.toml`` next to the package);
- ``flwr build`` of the checkout, the ``.fab`` unpacked, and ``flwr run .`` from the unpacked
  bundle against a SuperLink in simulation mode that this test starts on a free loopback
  port and stops (with everything it started) at the end.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import site
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from tests.processes import free_port, stop_tree

pytestmark = [pytest.mark.slow, pytest.mark.packaging]

ROOT = Path(__file__).resolve().parent.parent
TINY = ("synthetic-users=20 synthetic-items=50 synthetic-mean-interactions=15 eval-negatives=10 local-epochs=1 "
        "evaluate-every=2 report=false")
KIOSKS = "partitioning='group' users-per-client=10"  # 20 users / 10 = 2 SuperNodes
RUN_SECONDS = 600


def _dependency_dirs() -> list[str]:
    """Site-packages directories of the running interpreter (its dependencies), never the checkout."""
    dirs = [*site.getsitepackages(), *(p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages")))]
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir() and Path(d).resolve() != ROOT]


def _write_console_scripts(venv: Path, distribution: str) -> None:
    """``bin/<name>`` for each console script of ``distribution``, run by the fresh environment's Python."""
    for entry in importlib.metadata.distribution(distribution).entry_points:
        if entry.group != "console_scripts":
            continue
        script = venv / "bin" / entry.name
        script.write_text(
            f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom {entry.module} import {entry.attr.split('.')[0]} as _e\n"
            f"sys.exit(_e{''.join('.' + part for part in entry.attr.split('.')[1:])}())\n"
        )
        script.chmod(0o755)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """A fresh venv with only the built wheel installed; returns its paths and environment."""
    root = tmp_path_factory.mktemp("packaging")
    dist = root / "dist"
    build = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, (
        "python -m build failed (the dev extra installs build and hatchling):\n" + (build.stdout + build.stderr)[-3000:]
    )
    (wheel,) = dist.glob("fedrec-*.whl")
    assert len(list(dist.glob("fedrec-*.tar.gz"))) == 1
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps", "--no-index",
         "--quiet", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "fedrec-test-dependencies.pth").write_text("\n".join(_dependency_dirs()) + "\n")
    _write_console_scripts(venv, "flwr")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}/usr/local/bin{os.pathsep}/usr/bin{os.pathsep}/bin",
               FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_HOME=str(root / "flwr-home"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    work = root / "elsewhere"  # not the checkout: nothing of the source tree is importable from here
    work.mkdir()
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import common.config, server, client, simulations; "
                            "print(common.config.__file__)"], capture_output=True, text=True, cwd=work, env=env)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(venv), f"fedrec imported from {where.stdout.strip()}, not the wheel"
    return {"root": root, "venv": venv, "env": env, "work": work, "wheel": wheel}


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_fedrec_simulate_runs_from_the_installed_wheel(installed):
    run_dir = installed["root"] / "simulate-run"
    started = time.monotonic()
    result = subprocess.run(
        [str(installed["venv"] / "bin" / "fedrec"), "simulate", "--rounds", "2", "--run-dir", str(run_dir), "-c", TINY],
        capture_output=True, text=True, cwd=installed["work"], env=installed["env"], timeout=RUN_SECONDS,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    summary = _summary(run_dir)
    assert summary["rounds"] == 2
    assert summary["final_evaluation"]["test_count"] == 20
    config = json.loads((run_dir / "config.json").read_text())["run_config"]
    assert config["synthetic-users"] == 20 and config["learning-rate"] == 0.02  # an override and a code default
    print(f"fedrec simulate from the wheel: {time.monotonic() - started:.0f}s")


def test_flwr_run_from_an_unpacked_app_bundle(installed):
    root, env = installed["root"], installed["env"]
    bundle_dir = root / "fab"
    bundle_dir.mkdir()
    built = subprocess.run(["flwr", "build", "--app", str(ROOT)], capture_output=True, text=True, cwd=bundle_dir,
                           env=env, timeout=120)
    assert built.returncode == 0, built.stdout + built.stderr
    (fab,) = bundle_dir.glob("*.fab")
    app = root / "app"
    with zipfile.ZipFile(fab) as archive:
        archive.extractall(app)
    assert (app / "pyproject.toml").is_file()

    port = free_port()
    home = Path(env["FLWR_HOME"])
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "wheel"\n\n[superlink.wheel]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    log = root / "superlink.log"
    with log.open("wb") as out:
        superlink = subprocess.Popen(
            ["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess", "--host", "127.0.0.1",
             "--port", str(port), "--disable-runtime-dependency-installation"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True,
        )
    run_dir = root / "flwr-run"
    try:
        deadline = time.monotonic() + 90
        while "Uvicorn running on http://" not in log.read_text(errors="replace"):
            assert superlink.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        started = time.monotonic()
        result = subprocess.run(
            ["flwr", "run", ".", "wheel", "--stream", "--run-config", f"{TINY} {KIOSKS} num-server-rounds=2 "
             f"run-dir='{run_dir}'", "--federation-config", "num-supernodes=2"],
            capture_output=True, text=True, cwd=app, env=env, timeout=RUN_SECONDS,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-4000:] + log.read_text(errors="replace")[-3000:]
        summary = _summary(run_dir)
        assert summary["rounds"] == 2, output[-4000:]
        assert summary["final_evaluation"]["eval_clients"] == 2
        print(f"flwr run from the unpacked bundle: {time.monotonic() - started:.0f}s")
    finally:
        stop_tree(superlink)
