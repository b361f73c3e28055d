"""Fault injection for the tests of per-request fault isolation.

``SERVER_FAULT_INJECTION="stage@seed,..."`` (read at import) makes every request whose sampling seed is ``seed``
raise :class:`InjectedFault` at ``stage``: ``sample`` and ``stop_check`` in the engine, ``detokenize`` in the
HTTP process. Unset (always, outside tests), :func:`inject_fault` is one dictionary lookup that finds nothing.
"""

from __future__ import annotations

import os

STAGES = ("sample", "stop_check", "detokenize")


class InjectedFault(RuntimeError):
    """An error raised on purpose by a test's fault hook (never in normal runs)."""

    pass


def _parse(spec: str) -> frozenset[tuple[str, int]]:
    faults = set()
    for item in filter(None, (part.strip() for part in spec.split(","))):
        stage, _, seed = item.partition("@")
        if stage not in STAGES or not seed.lstrip("-").isdigit():
            raise ValueError(f"SERVER_FAULT_INJECTION: {item!r} is not 'stage@seed' with a stage in {STAGES}")
        faults.add((stage, int(seed)))
    return frozenset(faults)


_FAULTS = _parse(os.environ.get("SERVER_FAULT_INJECTION", ""))


def inject_fault(stage: str, seed: int | None) -> None:
    """Raise :class:`InjectedFault` if the environment asks for a fault at ``stage`` for requests with ``seed``."""
    if _FAULTS and (stage, seed) in _FAULTS:
        raise InjectedFault(f"injected fault at {stage} (SERVER_FAULT_INJECTION)")
