"""Fair shares of the engine between tenants: virtual token counters.

The engine serves many tenants (a server's API keys; without a server, its tunings) from one batch. Left
first-come first-served, one tenant that sends costly work (long prompts, 256 texts x 8 labels to score)
takes the engine's time from everyone else. Like VTC (Sheng et al., 2024, "Fairness in Serving Large
Language Models"), each tenant has a counter of the service it has had, in weighted tokens: a prompt or
scored token costs `INPUT_WEIGHT`, a generated token `OUTPUT_WEIGHT`. Whenever there is a choice (which
waiting request joins the batch, whether a scoring batch runs before the next decoding step) the tenant
with the least service goes first. A tenant that arrives with nothing in the engine starts at the least
counter of those that have work waiting or running, so time spent idle is not saved up as credit to
crowd others out later.

Work-conserving: when only one tenant has work, it has the whole engine.
"""

from __future__ import annotations

from collections.abc import Iterable

INPUT_WEIGHT = 1.0  # a prompt token, or a token of a scored row: computed in parallel with its neighbours
OUTPUT_WEIGHT = 2.0  # a generated token: one decoding step each, as VTC weighs them
MAX_TENANTS = 100_000  # counters kept; beyond it, those no higher than the least active one are forgotten


class FairShare:
    """Each tenant's service so far, and who is owed the next turn."""

    def __init__(self):
        self._served: dict[str, float] = {}

    def served(self, tenant: str) -> float:
        return self._served.get(tenant, 0.0)

    def arrive(self, tenant: str, active: Iterable[str]) -> None:
        """`tenant` has new work and none in the engine: it starts no lower than the least served of the
        tenants with work (`active`, which it is not in)."""
        floor = min((self._served.get(t, 0.0) for t in active if t != tenant), default=None)
        if floor is not None and self._served.get(tenant, 0.0) < floor:
            self._served[tenant] = floor
        if len(self._served) > MAX_TENANTS:
            self._forget(floor)

    def charge(self, tenant: str, tokens: float, weight: float = INPUT_WEIGHT) -> None:
        self._served[tenant] = self._served.get(tenant, 0.0) + tokens * weight

    def order(self, tenants: Iterable[str]) -> list[str]:
        """The tenants, least served first (ties: in the order given)."""
        return sorted(tenants, key=self.served)

    def least(self, tenants: Iterable[str]) -> float | None:
        """The least service of these tenants (None if there are none)."""
        return min((self.served(t) for t in tenants), default=None)

    def _forget(self, floor: float | None) -> None:
        # A forgotten tenant comes back at 0 and is lifted to the floor on arrival: the same as remembering it.
        floor = floor if floor is not None else max(self._served.values())
        self._served = {t: s for t, s in self._served.items() if s > floor}
