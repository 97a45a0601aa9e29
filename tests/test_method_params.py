"""Every method's numeric parameters go through one validation (algorithms/params.py):
NaN and infinity are refused as firmly as out-of-range values, with the parameter named."""

from __future__ import annotations

import pytest

from fedfair_med.algorithms import REGISTRY, build_algorithm
from fedfair_med.algorithms.params import check_number

NAN, INF = float("nan"), float("inf")

BAD = [
    ("flexfair", {"lam": NAN}, "lam"),
    ("flexfair", {"lam": INF}, "lam"),
    ("flexfair", {"lam": -0.5}, "lam"),
    ("flexfair", {"weighting": "equal"}, "weighting"),
    ("flexfair", {"penalty": "frozen"}, "penalty"),
    ("flexfair", {"statistics": "stale"}, "statistics"),
    ("fairfed", {"beta": INF}, "beta"),
    ("fairfed", {"beta": NAN}, "beta"),
    ("fairmixup", {"weight": INF}, "weight"),
    ("fairmixup", {"weight": NAN}, "weight"),
    ("fedprox", {"mu": INF}, "mu"),
    ("fednova", {"rho": NAN}, "rho"),
    ("fedavgm", {"beta": 1.0}, "beta"),
    ("fedavgm", {"beta": NAN}, "beta"),
    ("fedavgm", {"server_lr": 0.0}, "server_lr"),
    ("scaffold", {"server_lr": INF}, "server_lr"),
    ("scaffold", {"server_lr": NAN}, "server_lr"),
    ("dynamicfl", {"capacity": {"site-a": NAN}}, "capacity"),
    ("dynamicfl", {"capacity": True}, "capacity"),
]


@pytest.mark.parametrize("method, params, named", BAD)
def test_non_finite_or_out_of_range_parameters_are_refused(method, params, named):
    with pytest.raises(ValueError, match=named):
        build_algorithm(method, **params)


def test_every_method_with_numeric_parameters_is_covered():
    numeric = {m for m, cls in REGISTRY.items()
               if any(isinstance(v, (int, float)) and not isinstance(v, bool)
                      for v in cls.param_defaults().values())}
    assert numeric <= {m for m, _, _ in BAD}


@pytest.mark.parametrize("value", [True, "1", None, NAN, INF, -INF])
def test_check_number_refuses_non_numbers_and_non_finite(value):
    with pytest.raises(ValueError, match="x"):
        check_number("m", "x", value)


def test_check_number_ranges_and_open_ends():
    assert check_number("m", "x", 0, low=0.0) == 0.0
    assert check_number("m", "x", 0.5, low=0.0, high=1.0, high_open=True) == 0.5
    with pytest.raises(ValueError, match="> 0"):
        check_number("m", "x", 0.0, low=0.0, low_open=True)
    with pytest.raises(ValueError, match="< 1"):
        check_number("m", "x", 1.0, high=1.0, high_open=True)
    with pytest.raises(ValueError, match="integer"):
        check_number("m", "x", 1.5, integer=True)
