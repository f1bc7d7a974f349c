"""The selection policy: which backend a spec means (``auto``, a name, a list).

``auto`` takes the best available backend by priority, probing in order of
the highest priority each could report and preparing only the winner;
``a,b,c`` is a preference order (a backend this machine lacks is skipped,
visibly); a single name fails loudly when it cannot run.  The policy reads
the registry through ``Candidates``, so it sits below ``registry.py``.
"""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass, field
from typing import Protocol

from opswitch.core import probing
from opswitch.core.backend import Backend, Probe, Spec
from opswitch.core.errors import BackendError

ENV_BACKEND = "OPSWITCH_BACKEND"

Skipped = list[tuple[str, str]]  # (spec, why it was passed over)
Key = tuple[str, "str | None", str]  # (name, device, dtype)


@dataclass
class Selection:
    """The backend a spec resolved to, and a sentence saying why."""

    backend: Backend
    reason: str
    skipped: Skipped = field(default_factory=list)


class Candidates(Protocol):
    """What the policy needs from a registry."""

    def names(self) -> list[str]: ...
    def backend_class(self, name: str) -> type[Backend]: ...
    def backend(self, name: str, dtype: str = "float32", device: str | None = None) -> Backend: ...
    def available(self) -> list[str]: ...
    def unknown(self, name: str) -> BackendError: ...


def select(registry: Candidates, spec: str | None = None, dtype: str = "float32") -> Selection:
    """Resolve ``auto``, ``name[:device][:dtype]`` or ``a,b,c`` (default:
    $OPSWITCH_BACKEND or auto) to a probed, prepared backend."""
    text = (spec or os.environ.get(ENV_BACKEND) or "auto").strip().lower()
    wanted = [part.strip() for part in text.split(",") if part.strip()] or ["auto"]
    single = len(wanted) == 1 and wanted[0] != "auto"
    known = set(registry.names())
    skipped: Skipped = []
    tried: set[Key] = set()
    for i, choice in enumerate(wanted):
        if choice == "auto":
            chosen = _select_auto(registry, dtype, tried, skipped)
            if chosen is not None:
                return Selection(chosen[0], _why("auto", chosen[0], i, skipped, chosen[1]), skipped)
            continue
        parsed = Spec.parse(choice, dtype)
        if parsed.name not in known:
            if single:
                raise registry.unknown(parsed.name)
            # a list is a preference order across machines: a backend this one
            # lacks is skipped, visibly; a broken one says so
            skipped.append((parsed.name, _missing_reason(registry, parsed.name)))
            continue
        key = (parsed.name, parsed.device, parsed.dtype or dtype)
        if key in tried:
            continue
        tried.add(key)
        found = _probed(registry, parsed, dtype, skipped, raise_errors=single)
        if found is None:
            continue
        backend, probe = found
        failure = probing.prepare(backend)
        if failure:
            skipped.append((backend.spec, failure))
            continue
        return Selection(backend, _why(choice, backend, i, skipped, probe), skipped)
    available = ", ".join(registry.available()) or "none"
    if single:
        raise BackendError(
            f"backend {wanted[0]!r} is unavailable: {skipped[0][1]}; available backends: {available}"
        )
    reasons = "; ".join(f"{n}: {r}" for n, r in skipped) or "no backends are registered"
    raise BackendError(f"no backend of {text!r} is available ({reasons}); available backends: {available}")


def _probed(registry: Candidates, spec: Spec, dtype: str, skipped: Skipped, raise_errors: bool = False,
            ) -> tuple[Backend, Probe] | None:
    """The instance for ``spec`` and its probe, if available; else None, with why in ``skipped``."""
    try:
        backend = registry.backend(spec.name, spec.dtype or dtype, spec.device)
    except BackendError as exc:
        if raise_errors:
            raise
        skipped.append((spec.name, str(exc)))
        return None
    probe = probing.probe(backend)
    if not probe.available:
        skipped.append((backend.spec, probe.reason))
        return None
    return backend, probe


def _select_auto(registry: Candidates, dtype: str, tried: set[Key], skipped: Skipped,
                 ) -> tuple[Backend, Probe] | None:
    """The best backend for ``auto``: probe in order of the highest priority each
    could report, stop once nothing further down can beat a probed one, and
    prepare only the winner (the next best if the winner fails to prepare)."""
    ranked: list[tuple[int, int, Backend, Probe]] = []  # (-rank, order, backend, probe)

    def prepare_best(floor: int | None) -> tuple[Backend, Probe] | None:
        while ranked and (floor is None or -ranked[0][0] >= floor):
            _, _, backend, probe = heapq.heappop(ranked)
            failure = probing.prepare(backend)
            if not failure:
                return backend, probe
            skipped.append((backend.spec, failure))
        return None

    for order, cand in enumerate(_auto_order(registry, dtype)):
        key = (cand.name, cand.device, cand.dtype or dtype)
        if key in tried:
            continue
        tried.add(key)
        cls = registry.backend_class(cand.name)
        top = ceiling(cls)
        chosen = prepare_best(floor=top)  # what is probed already beats anything from here on
        if chosen:
            return chosen
        found = _probed(registry, cand, dtype, skipped)
        if found is None:
            continue
        backend, probe = found
        rank = probe.priority if isinstance(probe.priority, int) else cls.priority
        rank = min(rank, max(top, cls.priority))  # a probe may not outrank its declared ceiling
        heapq.heappush(ranked, (-rank, order, backend, probe))
    return prepare_best(floor=None)


def _auto_order(registry: Candidates, dtype: str) -> list[Spec]:
    """For auto: every backend that computes in ``dtype``, by the highest
    priority its probe could report (so a possible GPU is probed first)."""
    classes = {n: registry.backend_class(n) for n in registry.names()}
    names = [n for n, cls in classes.items() if dtype in cls.dtypes]
    return [Spec(n, None, dtype) for n in sorted(names, key=lambda n: (-ceiling(classes[n]), n))]


def _missing_reason(registry: Candidates, name: str) -> str:
    message = str(registry.unknown(name))
    return message if "is broken" in message else "no backend of that name is installed"


def ceiling(cls: type[Backend]) -> int:
    """The highest priority a backend's probe may report (auto probes in this order)."""
    return cls.max_priority if isinstance(cls.max_priority, int) else cls.priority


def _why(choice: str, backend: Backend, index: int, skipped: Skipped, probe: Probe) -> str:
    where = f" on {probe.device}" if probe.device else ""
    name = backend.spec
    if choice == "auto":
        reason = f"{name}{where}: highest-priority available backend (auto)"
    elif index == 0 and not skipped:
        reason = f"{name}{where}: requested"
    else:
        reason = f"{name}{where}: first available in the requested list"
    if skipped:
        reason += "; skipped " + "; ".join(f"{n} ({r})" for n, r in skipped)
    return reason
