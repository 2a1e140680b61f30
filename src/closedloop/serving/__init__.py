"""Serving: what keeps the warehouse fresh while ``closedloop serve`` runs.

A composition of the stages (like ``pipeline``), not a stage: after each load of collected
events the process that owns the warehouse resolves identities and refreshes the portrait,
tags and segments of the affected customers (``live``).
"""
