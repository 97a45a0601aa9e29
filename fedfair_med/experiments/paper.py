"""The FlexFair paper's published numbers, to set beside a study's own like for like.

Xing et al., "Achieving flexible fairness metrics in federated medical imaging", Nature
Communications 16 (2025), Tables 1 and 2. Every value there is the mean ± std over 5 seeds of
"the top 20 test results for each random seed" — our protocol (b) — so a study's section shows
them beside its own protocol (b) numbers, and beside protocol (a), which is the honest one.

Only numbers and facts stated in the paper's tables are kept here; what differs from a study
(sites, network, image size, seeds) is listed with each, so no reader mistakes a like-for-like
*protocol* for a like-for-like *experiment*.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

__all__ = ["PAPER", "PAPER_METHOD", "PaperColumn", "paper_column", "parse_pm"]

#: our method names -> the paper's (DynamicFL is ours; the paper has no row for it)
PAPER_METHOD = {"fedavg": "FedAvg", "fedprox": "FedProx", "scaffold": "SCAFFOLD",
                "fednova": "FedNova", "fairmixup": "FairMixup", "fairfed": "FairFed",
                "flexfair": "FlexFair"}


@dataclass(frozen=True)
class PaperColumn:
    """One task × criterion of the paper: its table, its rows and what differs from ours."""

    source: str
    metric: str
    gap: str
    rows: Mapping[str, tuple[str, str]]  # paper method -> (metric, gap), "mean ± std" as printed
    differs: tuple[str, ...]


_SEG = "Table 1 (segmentation, EA over sites)"
_SKIN = "Table 2 (skin, HAM10000 + BCN20000, binary)"
_SEG_NETWORK = ("Network: the paper's SANet with a Res2Net-50 backbone (pretraining not stated); "
                "ours a MONAI UNet trained from scratch (see the study's base).")
_SKIN_DIFFERS = (
    "Sites: the paper's two datasets HAM10000 and BCN20000 as sites (8,819 and 7,705 images after "
    "dropping rows without age or sex); ours HAM10000's four acquisition sites, image only.",
    "Network: the paper's ResNet-50; ours a MONAI ResNet-18 trained from scratch at the study's "
    "image size.",
)


def _rows(*lines: str) -> dict[str, tuple[str, str]]:
    """``"FedAvg | 0.867 ± 0.009 | 0.012 ± 0.009"`` lines, as the paper prints them."""
    out = {}
    for line in lines:
        method, metric, gap = (cell.strip() for cell in line.split("|"))
        out[method] = (metric, gap)
    return out


#: (task, criterion, attribute) of a study -> the paper's matching column
PAPER: dict[tuple[str, str, str], PaperColumn] = {
    ("polyp", "ea", "site"): PaperColumn(
        f"{_SEG}, polyp", "Dice", "EA", _rows(
            "FedAvg | 0.867 ± 0.009 | 0.012 ± 0.009", "FedProx | 0.881 ± 0.005 | 0.009 ± 0.007",
            "SCAFFOLD | 0.865 ± 0.007 | 0.010 ± 0.008", "FedNova | 0.881 ± 0.004 | 0.010 ± 0.007",
            "FairMixup | 0.872 ± 0.008 | 0.014 ± 0.009", "FairFed | 0.880 ± 0.005 | 0.008 ± 0.006",
            "FlexFair | 0.885 ± 0.004 | 0.009 ± 0.007"),
        ("Sites: the paper's CVC-300 (550 train / 60 test) and Kvasir (900 / 100); ours "
         "CVC-ClinicDB (split by video) and Kvasir-SEG, every image.", _SEG_NETWORK)),
    ("fundus", "ea", "site"): PaperColumn(
        f"{_SEG}, fundus", "Dice", "EA", _rows(
            "FedAvg | 0.653 ± 0.004 | 0.129 ± 0.005", "FedProx | 0.656 ± 0.003 | 0.130 ± 0.003",
            "SCAFFOLD | 0.657 ± 0.002 | 0.127 ± 0.005", "FedNova | 0.657 ± 0.004 | 0.130 ± 0.003",
            "FairMixup | 0.626 ± 0.027 | 0.093 ± 0.025", "FairFed | 0.657 ± 0.003 | 0.118 ± 0.006",
            "FlexFair | 0.658 ± 0.007 | 0.108 ± 0.009"),
        ("Sites: the paper's three, CHASE-DB1 (21 train / 7 test), DRIVE (20 / 20) and STARE "
         "(15 / 5); ours two, CHASE_DB1 and STARE (DRIVE's licence keeps it out), so our EA is "
         "over two sites and theirs over three.", _SEG_NETWORK)),
    ("mri", "ea", "site"): PaperColumn(
        f"{_SEG}, cervical MRI", "Dice", "EA", _rows(
            "FedAvg | 0.781 ± 0.020 | 0.020 ± 0.012", "FedProx | 0.797 ± 0.004 | 0.018 ± 0.008",
            "SCAFFOLD | 0.719 ± 0.007 | 0.712 ± 0.070", "FedNova | 0.798 ± 0.003 | 0.019 ± 0.008",
            "FairMixup | 0.798 ± 0.003 | 0.016 ± 0.007", "FairFed | 0.786 ± 0.007 | 0.023 ± 0.013",
            "FlexFair | 0.801 ± 0.003 | 0.014 ± 0.008"),
        ("Task: the paper segments cervical cancer on private MRI from four centres (2,420 train "
         "slices); ours segments the liver on sites derived from one public abdominal MRI volume. "
         "Not the same task: the paper's column is shown for orientation only.", _SEG_NETWORK)),
    ("skin", "dp", "age_band"): PaperColumn(
        f"{_SKIN}, DP over age (≤ 60 / > 60)", "accuracy", "DP", _rows(
            "FedAvg | 0.814 ± 0.010 | 0.125 ± 0.019", "FedProx | 0.821 ± 0.003 | 0.135 ± 0.002",
            "SCAFFOLD | 0.820 ± 0.004 | 0.135 ± 0.004", "FedNova | 0.821 ± 0.004 | 0.135 ± 0.002",
            "FairMixup | 0.823 ± 0.003 | 0.137 ± 0.002", "FairFed | 0.821 ± 0.004 | 0.136 ± 0.003",
            "FlexFair | 0.824 ± 0.004 | 0.125 ± 0.009"), _SKIN_DIFFERS),
    ("skin", "eo", "age_band"): PaperColumn(
        f"{_SKIN}, EO over age (≤ 60 / > 60)", "accuracy", "EO", _rows(
            "FedAvg | 0.805 ± 0.011 | 0.036 ± 0.012", "FedProx | 0.805 ± 0.011 | 0.036 ± 0.012",
            "SCAFFOLD | 0.804 ± 0.009 | 0.036 ± 0.011", "FedNova | 0.804 ± 0.011 | 0.036 ± 0.012",
            "FairMixup | 0.820 ± 0.007 | 0.047 ± 0.003", "FairFed | 0.803 ± 0.011 | 0.036 ± 0.013",
            "FlexFair | 0.825 ± 0.003 | 0.039 ± 0.006"), _SKIN_DIFFERS),
    ("skin", "dp", "sex"): PaperColumn(
        f"{_SKIN}, DP over sex", "accuracy", "DP", _rows(
            "FedAvg | 0.814 ± 0.016 | 0.017 ± 0.001", "FedProx | 0.816 ± 0.017 | 0.017 ± 0.001",
            "SCAFFOLD | 0.812 ± 0.013 | 0.017 ± 0.001", "FedNova | 0.818 ± 0.016 | 0.017 ± 0.001",
            "FairMixup | 0.821 ± 0.013 | 0.017 ± 0.001", "FairFed | 0.813 ± 0.016 | 0.017 ± 0.001",
            "FlexFair | 0.824 ± 0.003 | 0.011 ± 0.003"), _SKIN_DIFFERS),
    ("skin", "eo", "sex"): PaperColumn(
        f"{_SKIN}, EO over sex", "accuracy", "EO", _rows(
            "FedAvg | 0.802 ± 0.018 | 0.026 ± 0.006", "FedProx | 0.803 ± 0.018 | 0.026 ± 0.006",
            "SCAFFOLD | 0.803 ± 0.013 | 0.026 ± 0.006", "FedNova | 0.802 ± 0.018 | 0.026 ± 0.005",
            "FairMixup | 0.819 ± 0.016 | 0.031 ± 0.004", "FairFed | 0.804 ± 0.018 | 0.026 ± 0.005",
            "FlexFair | 0.823 ± 0.003 | 0.018 ± 0.006"), _SKIN_DIFFERS),
}


def paper_column(task: str, criterion: str, attribute: str) -> PaperColumn | None:
    """The paper's column for a study's task and fairness criterion, or None (no counterpart)."""
    return PAPER.get((str(task), str(criterion), str(attribute)))


def parse_pm(text: str) -> tuple[float, float]:
    """``"0.867 ± 0.009"`` -> (0.867, 0.009)."""
    mean, std = text.split("±")
    return float(mean), float(std)
