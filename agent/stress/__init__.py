"""`berth stress`: find where a service saturates, and the autoscaler setting that implies.

generator (the one load generator; no heavy imports), workload (what to send), service (where
to send and what the agent shows meanwhile), search (the modes), slo, stats (a step's figures),
report (verdict, JSON, HTML), charts (matplotlib), console (rich), run (the command), cli.
"""
