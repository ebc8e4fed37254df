"""``python -m simulations.audits SCENARIO OUT [-c 'key=value ...']`` until the fedrec CLI wires it."""

from __future__ import annotations

import argparse
import sys

from simulations.audits.run import SCENARIOS, run_audits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fedrec empirical privacy audits")
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("out", help="directory for audit.json (or a .json path)")
    parser.add_argument("-c", "--run-config", action="append", default=[],
                        help="run-config and audit-* overrides, TOML pairs like fedrec's -c")
    args = parser.parse_args(argv)
    from flwr.common.config import parse_config_args

    overrides = parse_config_args(args.run_config) if args.run_config else {}
    run_audits(args.scenario, overrides, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
