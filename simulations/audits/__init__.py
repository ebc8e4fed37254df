"""Empirical privacy audits of fedrec in simulation: interaction inference by a
curious server, membership inference on the final model, and one-run canary audits."""

from simulations.audits.run import SCENARIOS, run_audits

__all__ = ["SCENARIOS", "run_audits"]
