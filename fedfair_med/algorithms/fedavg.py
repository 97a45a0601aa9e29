"""FedAvg — McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017.

Each site runs E local epochs from the global model; the server averages the returned weights
with coefficients n_s / N. Every other method in this package is FedAvg plus a hook.
"""

from __future__ import annotations

from fedfair_med.algorithms.base import Algorithm


class FedAvg(Algorithm):
    name = "fedavg"
