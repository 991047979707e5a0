"""dp-accounting's RDP accountant without the rest of the package, for both ledgers.

``import dp_accounting`` runs the package's ``__init__``, which imports its PLD accountant and
mechanism calibration and, through them, most of SciPy: about 70 MiB of RSS and 0.6 s, more
than the whole numpy agent. The RDP accountant needs ``scipy.special`` only for subsampled
events, which a device never composes. :func:`rdp_modules` loads the two modules a ledger needs
(``rdp_privacy_accountant`` and ``dp_event``) from the installed package, with ``scipy.special``
bound to a proxy that imports the real module on first use. The numbers are the library's own,
computed by its code; tests check them against a plain import in a fresh interpreter. If the
package was already imported, or its layout changes, this falls back to the plain import.

It lives in the shared contract because both a device's local-DP accountant
(:mod:`edge_agent.privacy`) and the distributed-DP ledger (:mod:`fedmq.secagg.ddp`) use it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import sys
import threading
import types
from typing import Any

log = logging.getLogger("fedmq.rdp")

_LOAD_LOCK = threading.Lock()


@functools.cache
def rdp_modules() -> tuple[Any, Any]:
    """``dp_accounting.rdp.rdp_privacy_accountant`` and ``dp_accounting.dp_event``, loaded as above.

    Thread-safe: agents compute epsilons in worker threads, and the stand-in must never be seen
    by another thread's import.
    """
    with _LOAD_LOCK:
        return _load()


def rdp_accountant() -> tuple[Any, Any]:
    """``RdpAccountant`` and ``GaussianDpEvent`` (see :func:`rdp_modules`)."""
    accountant, events = rdp_modules()
    return accountant.RdpAccountant, events.GaussianDpEvent


def _load() -> tuple[Any, Any]:
    if "dp_accounting" not in sys.modules:
        try:
            return _load_rdp_only()
        except Exception:  # pragma: no cover - a dp_accounting layout this loader does not know
            log.debug("loading the RDP accountant alone failed; importing all of dp_accounting", exc_info=True)
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    return rdp_privacy_accountant, dp_event


class _DeferredModule(types.ModuleType):
    """Stands in for a module and imports the real one when an attribute is first read."""

    def __getattr__(self, name: str) -> Any:
        return getattr(importlib.import_module(self.__name__), name)


def _load_rdp_only() -> tuple[Any, Any]:
    spec = importlib.util.find_spec("dp_accounting")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("dp_accounting is not installed")
    package = types.ModuleType("dp_accounting")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    import scipy  # type: ignore[import-untyped]  # the package's own __init__ is light and loads its submodules lazily

    names = ("dp_accounting", "scipy.special")
    saved = {name: sys.modules.get(name) for name in names}
    sys.modules["dp_accounting"] = package
    if saved["scipy.special"] is None:
        sys.modules["scipy.special"] = _DeferredModule("scipy.special")
    try:
        from dp_accounting import dp_event
        from dp_accounting.rdp import rdp_privacy_accountant
    finally:
        # Leave nothing of the stand-ins behind: a later ``import dp_accounting`` or
        # ``import scipy.special`` anywhere in the process runs the real package code.
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        if isinstance(vars(scipy).get("special"), _DeferredModule):  # not getattr: that imports it
            delattr(scipy, "special")
    return rdp_privacy_accountant, dp_event
