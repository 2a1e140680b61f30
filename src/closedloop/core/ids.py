"""Deterministic ids and hashing.

Holdout groups, customer ids and sampling must survive restarts and give the same answer on
every engine, so they come from a keyed, stable hash (BLAKE2b), never from ``hash()``.
"""

from __future__ import annotations

import hashlib
import uuid


def stable_hash64(*parts: str) -> int:
    """A 64-bit unsigned integer that depends only on ``parts`` (joined unambiguously)."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        b = p.encode("utf-8")
        h.update(len(b).to_bytes(4, "big"))
        h.update(b)
    return int.from_bytes(h.digest(), "big")


def unit_interval(*parts: str) -> float:
    """A number in [0, 1) that is uniform over inputs and fixed for given ``parts``."""
    return stable_hash64(*parts) / 2.0**64


def new_message_id() -> str:
    """A random message id for messages that arrive without one."""
    return str(uuid.uuid4())


def customer_id_for(seed_identifier: str) -> str:
    """The customer id minted for a new cluster, derived from its founding identifier.

    Deriving (not drawing) the id makes a rebuild from scratch give the same ids.
    """
    return "c_" + format(stable_hash64("customer", seed_identifier), "016x")
