"""Meter definitions: the YAML model, its validation and JSONPath checks.

This package imports nothing else of meterlake's, so it can be used on its own to check a meters file.
"""

from meters.load import MeterConfigError, Problem, load_meters, load_meters_file, parse_meters
from meters.model import AGGREGATIONS, Billing, Meter, MeterSet, UnknownMeter, is_iana_zone

__all__ = [
    "AGGREGATIONS",
    "Billing",
    "Meter",
    "MeterConfigError",
    "MeterSet",
    "Problem",
    "UnknownMeter",
    "is_iana_zone",
    "load_meters",
    "load_meters_file",
    "parse_meters",
]
