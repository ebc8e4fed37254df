"""The ``fedrec`` command: everything that is not ``flwr run``.

Subcommands read the same run-config as the Flower app (``pyproject.toml`` defaults,
then ``--run-config`` overrides, then the explicit flags), so a baseline and a federated
run with the same flags use the same data, split and negatives.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import tomllib
from dataclasses import replace
from typing import Any, Mapping, Sequence

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def _common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", help="synthetic (default), movielens-100k, movielens-1m, ..., csv, parquet")
    parser.add_argument("--data-path", help="file or directory of a dataset you downloaded")
    parser.add_argument("--model", help="mf | gmf | mlp | neumf | als | ease (simulate: federated ALS or EASE; "
                        "baseline: centralized ALS or EASE, also itempop, random, all)")
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--run-config", "-c", action="append", default=[], metavar="'KEY=VALUE ...'",
        help="run-config overrides, as for `flwr run --run-config` (repeatable)",
    )


# KEY=VALUE pairs as `flwr run --run-config` reads them: a quoted value, or one without spaces.
_PAIR = re.compile(r"""(\S+?)=('[^']*'|"[^"]*"|\S+)""")


def _run_config_defaults() -> dict[str, Any]:
    from simulations.engine import fused_run_config

    return fused_run_config({})


def _toml_value(text: str) -> Any:
    """``text`` read as one TOML value (``0.02``, ``true``, ``"gmf"``); ValueError if it is none."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        raise ValueError(text) from None


def _config_value(key: str, text: str, default: Any) -> Any:
    """One ``-c`` value: TOML, except that a string key also takes its value unquoted."""
    if isinstance(default, str) and not text.startswith(("'", '"')):
        return text  # csv-rating-col=rating, data-path=/data/ratings.csv, mlp-layers=64,32
    try:
        return _toml_value(text)
    except ValueError:
        pass
    from common.config import ConfigError

    if default is None:
        raise ConfigError(f"-c {key}={text}: cannot read {text!r} as a value; quote strings, e.g. {key}=\"{text}\"")
    if isinstance(default, str):
        raise ConfigError(f"-c {key}={text}: unbalanced quotes; write {key}=value or {key}=\"value\"")
    kind = {bool: "true or false", int: "an integer", float: "a number"}[type(default)]
    raise ConfigError(f"-c {key}={text}: {key} takes {kind} (default {json.dumps(default)}); got {text!r}")


def parse_overrides(texts: Sequence[str], more_defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``-c`` arguments as a run-config dict; one clear line (ConfigError) for anything unreadable.

    The same syntax as ``flwr run --run-config`` (space-separated KEY=VALUE, TOML values,
    or a .toml file), except that string keys also accept unquoted values, since shells
    eat the quotes of ``-c key="value"``.
    """
    from common.config import ConfigError

    if len(texts) == 1 and texts[0].endswith(".toml"):
        from flwr.common.config import flatten_dict

        try:
            with open(os.path.expanduser(texts[0]), "rb") as handle:
                return flatten_dict(tomllib.load(handle))
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"-c {texts[0]}: not a readable TOML file ({err})") from None
    defaults = {**_run_config_defaults(), **(more_defaults or {})}
    overrides: dict[str, Any] = {}
    for text in texts:
        leftover = _PAIR.sub("", text).strip()
        if leftover:
            raise ConfigError(f"-c {text!r}: {leftover.split()[0]!r} is not KEY=VALUE (pairs are separated by spaces)")
        for key, value in _PAIR.findall(text):
            overrides[key] = _config_value(key, value, defaults.get(key))
    return overrides


def _overrides(
    args: argparse.Namespace, extra: dict[str, Any], more_defaults: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    overrides: dict[str, Any] = parse_overrides(args.run_config, more_defaults) if args.run_config else {}
    for key in ("dataset", "data_path", "seed"):
        if getattr(args, key, None) is not None:
            overrides[key.replace("_", "-")] = getattr(args, key)
    overrides.update({k: v for k, v in extra.items() if v is not None})
    return overrides


def _config(overrides: dict[str, Any]):
    from common.config import fused_run_config, parse_run_config

    return parse_run_config(fused_run_config(overrides))


def _yardstick_options(args: argparse.Namespace) -> tuple[dict[str, float], dict[str, float]]:
    """The EASE and ALS flags given, checked (unset ones keep simulations.yardsticks' defaults)."""
    from common.config import ConfigError

    flags = {  # flag: (option, minimum, minimum allowed)
        "ease_lambda": ("lam", 0.0, False), "als_factors": ("factors", 1, True),
        "als_iterations": ("iterations", 1, True), "als_regularization": ("reg", 0.0, True),
        "als_alpha": ("alpha", 0.0, True),
    }
    options: dict[str, float] = {}
    for flag, (option, minimum, inclusive) in flags.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if value < minimum or (value == minimum and not inclusive):
            raise ConfigError(f"--{flag.replace('_', '-')} must be {'>=' if inclusive else '>'} {minimum}; got {value}")
        options[option] = value
    return {k: v for k, v in options.items() if k == "lam"}, {k: v for k, v in options.items() if k != "lam"}


def check_baseline_flags(args: argparse.Namespace) -> None:
    """Training flags in range, before any data is loaded."""
    from common.config import ConfigError

    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ConfigError(f"{flag} must be an integer >= 1; got {value}")
    if not args.lr > 0:
        raise ConfigError(f"--lr must be a learning rate > 0; got {args.lr}")
    if args.negatives < 0 or (args.negatives < 1 and args.loss != "mse"):
        raise ConfigError(f"--negatives must be >= 1 (sampled negatives per positive for bce/bpr); got {args.negatives}")
    if args.weight_decay < 0:
        raise ConfigError(f"--weight-decay must be >= 0; got {args.weight_decay}")
    if args.dim is not None and args.dim < 1:
        raise ConfigError(f"--dim must be an integer >= 1; got {args.dim}")


def cmd_baseline(args: argparse.Namespace) -> int:
    from common.config import ConfigError
    from common.federation import describe_split, prepare
    from common.training import TrainConfig
    from simulations.baselines import (
        BASELINES,
        TORCH_MODELS,
        run_als,
        run_ease,
        run_itempop,
        run_random,
        run_trained,
        stderr_progress,
    )
    from simulations.report import baseline_table

    check_baseline_flags(args)
    model = args.model or "gmf"
    models = list(BASELINES) if model == "all" else [model]
    if any(m not in BASELINES for m in models):
        raise ConfigError(f"--model must be one of {', '.join(BASELINES)} or all; got {model!r}")
    trainable = next((m for m in models if m in TORCH_MODELS), "gmf")
    ease_options, als_options = _yardstick_options(args)
    config = _config(_overrides(args, {"model": trainable, "embedding-dim": args.dim}))
    prepared = prepare(config)
    print(f"fedrec baseline: {config.dataset}, {prepared.num_users} users, {prepared.num_items} items; "
          f"{describe_split(prepared.split_kind, config)}; {config.eval_negatives} evaluation negatives", file=sys.stderr)
    train_config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, num_negatives=args.negatives,
        loss=args.loss or config.loss, optimizer=config.local_optimizer, weight_decay=args.weight_decay,
        content_loss_weight=config.content_loss_weight,
    )
    results = []
    for name in models:
        print(f"fedrec baseline: {name}", file=sys.stderr)
        if name == "itempop":
            results.append(run_itempop(prepared))
        elif name == "random":
            results.append(run_random(prepared, seed=config.seed))
        elif name == "ease":
            results.append(run_ease(prepared, **ease_options))
        elif name == "als":
            results.append(run_als(prepared, seed=config.seed, progress=stderr_progress, **als_options))
        else:
            model_config = replace(config.model_config, name=name)
            results.append(run_trained(prepared, model_config, train_config, seed=config.seed, progress=stderr_progress,
                                       lazy_adam=args.lazy_adam))
    print(baseline_table(results, prepared))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump([r.__dict__ for r in results], handle, indent=2)
    return 0


# Packages of the full install that the client-only install (client/requirements.txt) leaves out.
SERVER_PACKAGES = {"ray": "flwr[simulation]", "matplotlib": "matplotlib", "jsonschema": "jsonschema"}


def require_server_packages(command: str, modules: Sequence[str], hint: str = "") -> None:
    """One line naming what to install when ``command`` runs on a client-only install."""
    import importlib.util

    from common.config import ConfigError

    def missing(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is None
        except (ImportError, ValueError):
            return True

    absent = [module for module in modules if missing(module)]
    if absent:
        specs = " ".join(f"'{SERVER_PACKAGES[m]}'" for m in absent)
        raise ConfigError(
            f"{command} needs {', '.join(absent)}, which the client-only install (client/requirements.txt) leaves out; "
            f"install them with `pip install {specs}` (or install fedrec with all its dependencies){hint}"
        )


def check_resume(config, overrides: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    """A resume that the server would refuse, refused before anything starts or is written."""
    from common.config import ConfigError
    from server.run_dir import check_resume_config, load_server_state
    from simulations.engine import fused_run_config

    if not config.resume or load_server_state(config.run_dir) is None:  # a truncated state: DataError
        return
    if config.record_dp:
        raise ConfigError(
            "resume with record-dp in simulation would restart every device's record-level epsilon at zero "
            "(their accountants lived in the killed process); start a new run-dir instead"
        )
    try:
        check_resume_config(config.run_dir, fused_run_config(overrides))
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None


def cmd_simulate(args: argparse.Namespace) -> int:
    require_server_packages("fedrec simulate", ["ray"])
    from common.config import check_against_data
    from common.federation import describe_split, slicer_cached
    from server.server_app import dp_population, user_level_dp
    from simulations.console import console
    from simulations.engine import run_in_process
    from simulations.scenario import load_scenario
    from simulations.vectorized import check_supported, run_vectorized

    overrides = _overrides(
        args, {"model": args.model, "num-server-rounds": args.rounds, "run-dir": args.run_dir,
               "resume": True if args.resume else None, "backend": args.backend}
    )
    if args.scenario:
        overrides = {**load_scenario(args.scenario), **overrides}
    config = _config(overrides)
    if config.report:
        require_server_packages("fedrec simulate", ["matplotlib", "jsonschema"], hint=", or run with -c report=false")
    slicer = slicer_cached(config)
    num_clients = len(slicer)
    check_against_data(config, slicer.prepared.num_items, num_clients)
    user_level_dp(config, dp_population(config, True, num_clients))  # a bad delta: one line before any round
    check_resume(config, overrides)
    if config.backend == "vectorized":
        check_supported(config)
    print(
        f"fedrec simulate: {config.model} on {config.dataset}, {num_clients} clients, "
        f"{config.num_server_rounds} rounds, {describe_split(slicer.prepared.split_kind, config)} -> {config.run_dir}",
        file=sys.stderr,
    )
    with console(args.verbose):
        if config.backend == "vectorized":
            run_vectorized(overrides)
        else:
            run_in_process(overrides, num_clients, verbose=args.verbose)
    summary_path = os.path.join(config.run_dir, "summary.json")
    with open(summary_path, encoding="utf-8") as handle:
        summary = json.load(handle)
    final = summary.get("final_evaluation", {})
    if not final.get("test_count"):
        print(f"fedrec: error: no client evaluated successfully; see the log above and {config.run_dir}", file=sys.stderr)
        return 1
    print(
        f"final ({final.get('test_count', 0):.0f} users): "
        f"HR@10 {final.get('test_sampled_hr@10', float('nan')):.4f}  "
        f"NDCG@10 {final.get('test_sampled_ndcg@10', float('nan')):.4f}  "
        f"full HR@10 {final.get('test_full_hr@10', float('nan')):.4f}  "
        f"full NDCG@10 {final.get('test_full_ndcg@10', float('nan')):.4f}  "
        f"in {summary['wall_seconds']:.0f}s; run dir {config.run_dir}"
    )
    if final.get("new_count"):
        print(f"new items ({final['new_count']:.0f} users, never trained on): HR@10 {final['new_sampled_hr@10']:.4f}  "
              f"NDCG@10 {final['new_sampled_ndcg@10']:.4f}")
    report = os.path.join(config.run_dir, "report.html")
    print(f"results: {config.run_dir}/ (summary.json, metrics.csv, checkpoints/)"
          + (f"; report {report}" if os.path.exists(report) else ""))
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    """Write a CA and a SuperLink certificate, then show the flags that use them."""
    from common.config import ConfigError
    from server.credentials import CA_CERT, CA_KEY, DEFAULT_HOSTS, SERVER_CERT, SERVER_KEY, make_certificates

    if args.days < 1:
        raise ConfigError(f"--days must be at least 1; got {args.days}")
    # The loopback names stay in: the SuperLink's own SuperExec dials 127.0.0.1 (or ::1)
    # and verifies the certificate against --ssl-ca-certfile like any other client.
    extra = [h.strip() for h in args.host]
    hosts = list(dict.fromkeys([*DEFAULT_HOSTS, *extra]))
    try:
        paths = make_certificates(args.out, hosts, days=args.days, force=args.force)
    except ValueError as err:  # an empty or non-ASCII --host
        raise ConfigError(f"--host: {err}") from err
    for path in paths.values():
        print(f"wrote {path}")
    ca, cert, key = (shlex.quote(str(paths[n].resolve())) for n in (CA_CERT, SERVER_CERT, SERVER_KEY))
    first = (extra or hosts)[0]
    dial = first if ":" not in first or first.startswith("[") else f"[{first}]"
    print(f"\nserver certificate for: {', '.join(hosts)} (valid {args.days} days)")
    print(f"SuperLink:  flower-superlink --ssl-ca-certfile {ca} --ssl-certfile {cert} --ssl-keyfile {key}")
    print(f"SuperNode:  flower-supernode --superlink {dial}:8000 --root-certificates {ca} ...")
    print(f"flwr CLI:   root-certificates = {json.dumps(str(paths[CA_CERT].resolve()))}  "
          "(in the [superlink.<name>] section of ~/.flwr/config.toml)")
    print(f"Copy only {CA_CERT} to SuperNodes and users; {SERVER_KEY} stays on the SuperLink "
          f"and {CA_KEY} off both.")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """Write SuperNode key pairs, then show how to register and use them."""
    from common.config import ConfigError
    from server.credentials import make_supernode_keys, supernode_key_names

    if args.count < 1:
        raise ConfigError(f"--count must be at least 1; got {args.count}")
    paths = make_supernode_keys(args.out, args.count, force=args.force)
    for path in paths.values():
        print(f"wrote {path}")
    key, pub = (shlex.quote(str(paths[n].resolve())) for n in supernode_key_names(1))
    print("\nSuperLink:  flower-superlink --enable-supernode-auth <TLS flags from `fedrec certs`>")
    print("Register:   flwr supernode register <supernode-N.pub> [<superlink-connection>]   (once per node)")
    print(f"            e.g. flwr supernode register {pub}")
    print(f"SuperNode:  flower-supernode --auth-supernode-private-key {key} --root-certificates <ca.crt> ...")
    print("Each supernode-N.key goes to SuperNode N only; the .pub files to whoever runs `flwr supernode register`.")
    return 0


def flower_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower's processes: this interpreter's scripts first on PATH.

    SuperLinks and SuperNodes start ``flower-superexec`` by name, so it has to resolve to
    the same installation as fedrec even when the virtual environment is not activated.
    """
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    return env


def _exec(command: list[str], dry_run: bool) -> int:
    """Print ``command``; then become it (signals reach Flower directly) unless a dry run."""
    print(shlex.join(command), flush=True)
    if dry_run:
        return 0
    env = flower_env()
    os.execvpe(command[0], command, env)
    return 0  # not reached


def cmd_superlink(args: argparse.Namespace) -> int:
    """Run a SuperLink over TLS with SuperNode authentication."""
    from server.credentials import CA_CERT
    from server.deployment import superlink_command, tls_files, write_flwr_connection

    command = superlink_command(
        args.certs, host=args.host, port=args.port, database=args.database,
        supernode_auth=not args.no_supernode_auth,
    )
    if args.connection:
        dial = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        path = write_flwr_connection(
            os.environ.get("FLWR_HOME", os.path.expanduser("~/.flwr")), args.connection,
            f"{dial}:{args.port}", tls_files(args.certs)[CA_CERT],
        )
        print(f"flwr CLI connection {args.connection!r} -> {dial}:{args.port} written to {path}")
    return _exec(command, args.dry_run)


def cmd_supernode(args: argparse.Namespace) -> int:
    """Run a SuperNode bound to one data partition, over TLS, authenticated by its key."""
    from client.deployment import supernode_command

    try:
        command = supernode_command(
            args.superlink, partition_id=args.partition_id, num_partitions=args.num_partitions,
            ca_cert=args.ca, private_key=args.key, clientappio_port=args.port, state_dir=args.state_dir,
        )
    except ValueError as err:
        from common.config import ConfigError

        raise ConfigError(str(err)) from err
    return _exec(command, args.dry_run)


def cmd_report(args: argparse.Namespace) -> int:
    require_server_packages("fedrec report", ["matplotlib", "jsonschema"])
    import jsonschema

    from server.report import write_report

    try:
        paths = write_report(args.run_dir, args.out, pdf=args.pdf, frontier=args.frontier)
    except jsonschema.ValidationError as err:
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        print(f"fedrec: error: {args.run_dir}: the report does not match report.schema.json at {where}: {err.message}",
              file=sys.stderr)
        return 2
    for path in paths.values():
        print(f"fedrec report: {path}")
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    """Top-K on the device: from an exported model (torch only) or from the device's state-dir."""
    from pathlib import Path

    import torch

    from common.config import ConfigError

    try:
        extra_seen = [int(part) for part in args.extra_seen.split(",") if part.strip()] if args.extra_seen else []
    except ValueError:
        raise ConfigError(f"--extra-seen must be comma-separated item ids like '3,17'; got {args.extra_seen!r}") from None
    if args.k < 1:
        raise ConfigError(f"--k must be >= 1; got {args.k}")
    if args.user is not None and args.user < 0:
        raise ConfigError(f"--user must be a global user id >= 0; got {args.user}")
    if args.state_dir is not None:
        from client.recommend import recommend_on_device

        if args.user is None:
            raise ConfigError("fedrec recommend --state-dir needs --user (a global user id on this device)")
        if not Path(args.state_dir).is_dir():  # checked here: the device's lock would create it
            raise ConfigError(f"--state-dir {args.state_dir}: no such directory (a SuperNode's --state-dir)")
        answer = recommend_on_device(args.state_dir, args.user, args.k, extra_seen=extra_seen, num_threads=args.threads)
        what = "the server's popular items (no interactions yet)" if answer.source == "popular" else "the user's model"
        print(f"# user {args.user}: {what}, global model of round {answer.model_round}", file=sys.stderr)
        items, scores = answer.items.tolist(), answer.scores.tolist()
    else:
        path = Path(args.model_file)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such exported model (written by client.export.export_for_client)")
        torch.set_num_threads(args.threads)
        try:
            model = torch.jit.load(str(path))
        except (RuntimeError, ValueError) as err:
            reason = " ".join(str(err).split(".")[0].split())
            raise ConfigError(f"{path}: not an exported TorchScript model (client/export.py writes them; {reason})") from None
        try:
            top_items, top_scores = model(torch.tensor(extra_seen, dtype=torch.long), args.k)
        except torch.jit.Error as err:  # the module's own checks (ids out of range)
            raise ConfigError(str(err).strip().splitlines()[-1]) from None
        items, scores = top_items.tolist(), top_scores.tolist()
    for rank, (item, score) in enumerate(zip(items, scores, strict=True), start=1):
        print(f"{rank}\t{item}\t{score:.6f}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """One user's recommender file (what `fedrec recommend --model-file` serves), made on the device."""
    from client.export import export_from_run

    path, server_round = export_from_run(args.run_dir, args.user, args.out, state_dir=args.state_dir,
                                         partition_id=args.partition_id, lite=args.lite)
    print(f"wrote {path}: user {args.user}, global model of round {server_round}; keep it on the device")
    return 0


def cmd_device(args: argparse.Namespace) -> int:
    """A kiosk operator's edits of a device state (client/store.py); the next round sees them."""
    from client import store
    from common.config import ConfigError

    def ids(text: str | None, what: str, kind=int) -> list:
        try:
            return [kind(part) for part in (text or "").split(",") if part.strip()]
        except ValueError:
            raise ConfigError(f"{what} must be comma-separated numbers like '3,17'; got {text!r}") from None

    if args.user is not None and args.user < 0:
        raise ConfigError(f"--user must be a global user id >= 0; got {args.user}")
    if args.action == "create" and args.num_items is None:
        raise ConfigError("fedrec device create needs --num-items (the catalogue size of the federation)")
    if args.action in ("add-user", "add-interactions", "forget-user") and args.user is None:
        raise ConfigError(f"fedrec device {args.action} needs --user (a global user id)")
    if args.action == "create":
        state = store.create(args.state_dir, args.num_items)
    elif args.action == "add-user":
        state = store.add_user(args.state_dir, args.user, ids(args.items, "--items"),
                               ids(args.ratings, "--ratings", float) or None)
    elif args.action == "add-interactions":
        from client.coldstart import add_interactions_and_learn  # torch training code: only for this action

        state, learned = add_interactions_and_learn(args.state_dir, args.user, ids(args.items, "--items"),
                                                    ids(args.ratings, "--ratings", float) or None)
        print(f"user {args.user}: rows updated now against the device's global model" if learned else
              f"user {args.user}: interactions recorded; rows are fitted when next recommended or trained"
              " (no rows or no global model on this device yet, or record-level DP)", file=sys.stderr)
    elif args.action == "forget-user":
        state = store.forget_user(args.state_dir, args.user)
    else:
        state = store.load(args.state_dir)
    counts = {int(u): int((state.train_users == u).sum()) for u in state.users}
    print(f"{store.state_file(args.state_dir)}: {len(state.users)} user(s), {state.num_items} items")
    for user, count in counts.items():
        print(f"  user {user}: {count} interaction(s)")
    return 0


AUDIT_SCENARIOS = ("interaction-inference", "membership", "canary", "all")  # simulations.audits.SCENARIOS, without torch


def cmd_audit(args: argparse.Namespace) -> int:
    """Audit a run's setting: its own run-config (if RUN_DIR holds a run) plus the flags."""
    from pathlib import Path

    from simulations.audits import run_audits
    from simulations.audits.run import AUDIT_DEFAULTS

    run_dir = Path(args.run_dir)
    base: dict[str, Any] = {}
    if (run_dir / "config.json").exists():
        base = dict(json.loads((run_dir / "config.json").read_text(encoding="utf-8"))["run_config"])
        print(f"fedrec audit: auditing the setting of the run in {run_dir}", file=sys.stderr)
    overrides = {**base, **_overrides(args, {"model": args.model}, AUDIT_DEFAULTS)}
    result = run_audits(args.scenario, overrides, run_dir)
    if (run_dir / "privacy.json").exists():
        from server.report import write_report

        print(f"fedrec audit: report updated: {write_report(run_dir)['html']}", file=sys.stderr)
    else:
        print(f"fedrec audit: no training run in {run_dir}; `fedrec report` needs one (fedrec simulate --run-dir)",
              file=sys.stderr)
    failed = [name for name, r in result["audits"].get("canary", {}).items()
              if str(r.get("verdict", "")).startswith("failed")]
    if failed:
        print(f"fedrec audit: FAILED: the epsilon lower bound exceeds the accountant's epsilon in {', '.join(failed)}",
              file=sys.stderr)
    return 1 if failed else 0


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line (what is wrong, where to look) and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fedrec", description="Federated, privacy-preserving recommendation on Flower.")
    sub = parser.add_subparsers(dest="command", required=True)

    baseline = sub.add_parser("baseline", help="train centrally on the federated split and print metrics")
    _common_flags(baseline)
    # Central training fits one model on every user's data at once, so its defaults are the
    # usual centralized NCF ones, not the run-config's, which are sized for one device's data.
    baseline.add_argument("--epochs", type=int, default=20, help="passes over the whole training set (default: "
                          "%(default)s; run-config local-epochs is per device per round)")
    baseline.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: %(default)s for one model "
                          "over all users; run-config learning-rate 0.02 is for a device's few dozen interactions)")
    baseline.add_argument("--batch-size", type=int, default=256, help="mini-batch size (default: %(default)s; "
                          "run-config batch-size 32 is for a device's own data)")
    baseline.add_argument("--negatives", type=int, default=4, help="sampled negatives per positive (default: "
                          "%(default)s, as run-config num-negatives)")
    baseline.add_argument("--dim", type=int, default=None, help="embedding size (default: run-config embedding-dim)")
    baseline.add_argument("--loss", choices=("bce", "bpr", "mse"), help="bce/bpr (implicit) or mse (explicit ratings)")
    baseline.add_argument("--weight-decay", type=float, default=0.0)
    baseline.add_argument("--json", help="also write the results to this JSON file")
    baseline.add_argument("--lazy-adam", action="store_true",
                          help="Adam steps only the embedding rows of each batch: epoch time linear in the ratings "
                          "(large data); converges in more epochs at the same --lr")
    baseline.add_argument("--ease-lambda", type=float, help="EASE's L2 weight, added to item counts (default 500)")
    baseline.add_argument("--als-factors", type=int, help="ALS factors per user and item (default 32)")
    baseline.add_argument("--als-iterations", type=int, help="ALS sweeps; the best on validation is kept (default 15)")
    baseline.add_argument("--als-regularization", type=float, help="ALS L2 weight (default 0.1)")
    baseline.add_argument("--als-alpha", type=float, help="ALS confidence of an observed item: 1 + alpha (default 5)")
    baseline.set_defaults(func=cmd_baseline)

    simulate = sub.add_parser("simulate", help="run the federated app in-process on the Simulation Engine")
    simulate.add_argument("scenario", nargs="?", help="a scenario TOML file of run-config keys (simulations/scenarios/)")
    _common_flags(simulate)
    simulate.add_argument("--rounds", type=int, help="num-server-rounds")
    simulate.add_argument("--run-dir", help="where metrics, checkpoints and the summary go")
    simulate.add_argument("--verbose", action="store_true", help="debug logs from Flower and Ray")
    simulate.add_argument("--backend", choices=("flower", "vectorized"),
                          help="run-config backend: Flower's Simulation Engine (default) or the devices batched in-process")
    simulate.add_argument("--resume", action="store_true", help="continue the run in --run-dir after its last completed round")
    simulate.set_defaults(func=cmd_simulate)

    certs = sub.add_parser("certs", help="write a CA and a SuperLink TLS certificate (ca.crt, server.pem, server.key)")
    certs.add_argument("--out", required=True, help="directory for the files (created if missing)")
    certs.add_argument(
        "--host", action="append", default=[], metavar="H",
        help="name or IP the SuperNodes dial, repeatable; added to localhost 127.0.0.1 ::1, which are always in",
    )
    certs.add_argument("--days", type=int, default=365, help="validity of both certificates")
    certs.add_argument("--force", action="store_true", help="overwrite existing files")
    certs.set_defaults(func=cmd_certs)

    keys = sub.add_parser("keys", help="write SuperNode authentication key pairs (supernode-N.key / .pub)")
    keys.add_argument("--out", required=True, help="directory for the files (created if missing)")
    keys.add_argument("--count", type=int, required=True, help="number of SuperNodes")
    keys.add_argument("--force", action="store_true", help="overwrite existing files")
    keys.set_defaults(func=cmd_keys)

    superlink = sub.add_parser("superlink", help="run flower-superlink with TLS and SuperNode authentication")
    superlink.add_argument("--certs", required=True, help="directory written by `fedrec certs`")
    superlink.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 across machines)")
    superlink.add_argument("--port", type=int, default=8000, help="HTTPS port of the Fleet and Control APIs")
    superlink.add_argument("--database", help="SQLite file, so registered SuperNodes survive a restart")
    superlink.add_argument("--no-supernode-auth", action="store_true", help="accept any SuperNode (not recommended)")
    superlink.add_argument(
        "--connection", metavar="NAME",
        help="also write [superlink.NAME] (address + ca.crt) to $FLWR_HOME/config.toml for `flwr run . NAME`",
    )
    superlink.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    superlink.set_defaults(func=cmd_superlink)

    supernode = sub.add_parser("supernode", help="run flower-supernode for one data partition over TLS")
    supernode.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address")
    supernode.add_argument("--ca", required=True, help="ca.crt from `fedrec certs` (the only file a device needs)")
    supernode.add_argument("--key", help="this node's supernode-N.key from `fedrec keys` (its .pub registered)")
    supernode.add_argument("--partition-id", type=int, required=True, help="this node's data partition")
    supernode.add_argument("--num-partitions", type=int, required=True, help="partitions in the federation")
    supernode.add_argument("--port", type=int, default=9094, help="local ClientAppIo port; unique per node on one machine")
    supernode.add_argument("--state-dir", help="keep this device's users and their rows on disk (survive restarts)")
    supernode.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    supernode.set_defaults(func=cmd_supernode)

    report = sub.add_parser("report", help="write the privacy audit report (report.html + report.json) of a run")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (run-config run-dir)")
    report.add_argument("--out", help="write the report here instead of into RUN_DIR")
    report.add_argument("--pdf", action="store_true", help="also print report.pdf (needs Chromium or Chrome)")
    report.add_argument("--frontier", metavar="FILE.json",
                        help="draw the run's privacy-utility point against this frontier (python -m simulations.frontier)")
    report.set_defaults(func=cmd_report)

    audit = sub.add_parser(
        "audit", help="empirical privacy audits (interaction inference, membership inference, canaries) in simulation",
        description="Attacks with known ground truth, run in-process with the real client code. With --run-dir "
        "pointing at a run, its run-config is the starting point and audit.json lands in its report. "
        "audit-* keys in -c tune the audits (see simulations/audits/run.py). A canary audit prints its epsilon "
        "lower bound, its ceiling (the most it could print) and the accountant's epsilon with delta; it passes only "
        "when the ceiling is above the claim, and a bound above the claim exits with code 1.",
    )
    _common_flags(audit)
    audit.add_argument("--scenario", required=True, choices=AUDIT_SCENARIOS)
    audit.add_argument("--run-dir", required=True, help="where audit.json goes (a run directory: its report is updated)")
    audit.set_defaults(func=cmd_audit)

    recommend = sub.add_parser("recommend", help="top-K on the device: from an exported model or the device's state-dir")
    source = recommend.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-file", help="a user's exported model (client/export.py, TorchScript)")
    source.add_argument("--state-dir", help="the SuperNode's state-dir: its users' rows and the last global model")
    recommend.add_argument("--user", type=int, help="with --state-dir: the user's global id")
    recommend.add_argument("--k", type=int, default=10)
    recommend.add_argument("--extra-seen", help="comma-separated item ids to exclude besides the trained ones")
    recommend.add_argument("--threads", type=int, default=1, help="torch threads (a device shares its cores)")
    recommend.set_defaults(func=cmd_recommend)

    export = sub.add_parser(
        "export", help="on the device: one user's recommender file from a run's final model (for recommend --model-file)",
        description="Bakes the run's final global model (RUN_DIR/checkpoints/final.npz and config.json, which "
        "every device receives anyway) and the user's own rows into one TorchScript file. The rows are the "
        "device's trained ones (--state-dir) or are fitted here, on the device, from the user's interactions "
        "against the frozen final model; they never go to the server.",
    )
    export.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (run-config run-dir)")
    export.add_argument("--user", type=int, required=True, help="the user's global id")
    export.add_argument("--out", required=True, help="the file to write, e.g. user-17.pt")
    where = export.add_mutually_exclusive_group()
    where.add_argument("--state-dir", help="the device's state-dir (its users, interactions and trained rows)")
    where.add_argument("--partition-id", type=int,
                       help="the data partition the run gave the device (default: the one holding --user)")
    export.add_argument("--lite", action="store_true", help="PyTorch Mobile lite-interpreter format (.ptl)")
    export.set_defaults(func=cmd_export)

    device = sub.add_parser("device", help="a kiosk's device state on disk: create, add or forget users, show")
    device.add_argument("action", choices=("create", "add-user", "add-interactions", "forget-user", "show"))
    device.add_argument("--state-dir", required=True, help="the SuperNode's state-dir")
    device.add_argument("--user", type=int, help="global user id (add-user, add-interactions, forget-user)")
    device.add_argument("--items", help="comma-separated item ids")
    device.add_argument("--ratings", help="comma-separated ratings, one per item (explicit losses only)")
    device.add_argument("--num-items", type=int, help="catalogue size (create)")
    device.set_defaults(func=cmd_device)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, or a bad command line (one line already printed)
        return int(done.code or 0)
    from common.config import ConfigError
    from common.errors import DataError
    from common.threads import use_threads

    try:
        use_threads()  # FEDREC_THREADS, checked here so a bad value is one line and exit 2
    except ValueError as err:
        print(f"fedrec: error: {err}", file=sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except FileExistsError as err:
        print(f"fedrec: error: {err.filename or err} exists; pass --force to overwrite", file=sys.stderr)
        return 2
    except (DataError, ConfigError, FileNotFoundError) as err:
        print(f"fedrec: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
