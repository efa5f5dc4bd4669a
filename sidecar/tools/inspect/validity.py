"""A certificate's time window at `now`, and durations and times the way a person reads them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sidecar.times import rfc3339
from sidecar.tools.inspect.certview import CertView


def span(seconds: float) -> str:
    """A duration the way a person says it: "41 min", "3 h", "12 days"."""
    s = abs(seconds)
    if s < 90:
        return f"{round(s)} s"
    if s < 90 * 60:
        return f"{round(s / 60)} min"
    if s < 48 * 3600:
        return f"{round(s / 3600)} h"
    return f"{round(s / 86400)} days"


@dataclass(frozen=True, slots=True)
class Validity:
    seconds_left: int  # until notAfter; negative once expired
    early_by: float  # > 0: notBefore is this far in the future
    late_by: float  # > 0: notAfter passed this long ago
    skew_suspected: bool  # outside the window by less than the clock-skew hint

    @property
    def words(self) -> str:
        if self.early_by > 0:
            hint = ": check the clocks" if self.skew_suspected else ""
            return f"not yet valid for {span(self.early_by)}{hint}"
        if self.late_by > 0:
            hint = ": check the clocks, or whether the issuer still rotates" \
                if self.skew_suspected else ""
            return f"expired {span(self.late_by)} ago{hint}"
        return f"expires in {span(self.seconds_left)}"


def validity(view: CertView, now: datetime, skew: timedelta) -> Validity:
    early = (view.not_before - now).total_seconds()
    late = (now - view.not_after).total_seconds()
    gap = max(early, late)
    return Validity(int((view.not_after - now).total_seconds()), max(early, 0.0),
                    max(late, 0.0), 0 < gap <= skew.total_seconds())


def iso(t: datetime) -> str:
    return rfc3339(t)
