"""The validated meter model: plain frozen dataclasses, no behaviour beyond what billing needs."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import zoneinfo
from dataclasses import asdict, dataclass, field

AGGREGATIONS = ("SUM", "COUNT", "UNIQUE_COUNT", "AVG", "MIN", "MAX", "LATEST")
PERIODS = ("MONTH", "WEEK", "DAY")
# Columns every output table has; a groupBy key may not shadow them.
RESERVED_COLUMNS = ("subject", "window_start", "window_end", "value", "event_count", "period_start", "date")
# Files of the system's zoneinfo folder that zoneinfo loads but that are not IANA zones: the host's own
# setting (it differs between machines), the POSIX default rules, tzdata's "Factory" placeholder, and the
# "posix/" and "right/" (leap-second) copies. Polars (chrono-tz, the IANA database) refuses every one of them.
_NOT_IANA_ZONES = frozenset({"localtime", "posixrules", "Factory"})


def is_iana_zone(name: object) -> bool:
    """Whether `name` is an IANA time zone that both zoneinfo and Polars know (e.g. UTC, Europe/Berlin)."""
    if not isinstance(name, str) or name in _NOT_IANA_ZONES or name.startswith(("posix/", "right/")):
        return False
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, TypeError):
        return False
    return True


@dataclass(frozen=True)
class Billing:
    period: str = "MONTH"
    timezone: str = "UTC"
    anchor_day: int = 1


@dataclass(frozen=True)
class Meter:
    slug: str
    event_type: str
    aggregation: str
    value_property: str | None = None
    group_by: dict[str, str] = field(default_factory=dict)
    description: str | None = None
    # OpenMeter's eventFrom (aware, UTC): the meter ignores events before it.
    event_from: dt.datetime | None = None
    # JSONPaths rewritten into the dialect Polars' json_path_match reads (same meaning).
    value_path: str | None = None
    group_paths: dict[str, str] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """Hash of everything that changes the meter's numbers (description, name, metadata excluded)."""
        payload = {
            "event_type": self.event_type,
            "aggregation": self.aggregation,
            "value_path": self.value_path,
            "group_paths": list(self.group_paths.items()),
        }
        if self.event_from is not None:  # only when set: meters without it keep the fingerprints they had
            payload["event_from"] = self.event_from.isoformat()
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class UnknownMeter(KeyError):
    """A slug the meters file does not define. A KeyError for callers that catch one; its text is the plain
    message (a bare KeyError prints its argument quoted, as a deployment run's failure shows it)."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class MeterSet:
    billing: Billing
    meters: tuple[Meter, ...]

    def get(self, slug: str) -> Meter:
        for meter in self.meters:
            if meter.slug == slug:
                return meter
        known = ", ".join(m.slug for m in self.meters) or "none"
        raise UnknownMeter(f"unknown meter {slug!r} (known: {known})")

    def select(self, slugs: list[str] | None) -> MeterSet:
        if not slugs:
            return self
        return MeterSet(self.billing, tuple(self.get(s) for s in slugs))

    def fingerprints(self) -> dict[str, str]:
        """Per-meter fingerprint including the billing block, which shapes every period table."""
        billing = json.dumps(asdict(self.billing), sort_keys=True)
        return {m.slug: hashlib.sha256((m.fingerprint() + billing).encode()).hexdigest()[:16] for m in self.meters}
