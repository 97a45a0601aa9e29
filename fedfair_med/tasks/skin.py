"""Skin-lesion classification from dermoscopy (e.g. HAM10000, one site per acquisition ``dataset``).

Binary by default: malignant (1) vs benign (0). A manifest label is either ``0``/``1`` (also
``benign``/``malignant``) or a HAM10000 diagnosis code, where ``mel``, ``bcc`` and ``akiec`` are
malignant and ``nv``, ``bkl``, ``df``, ``vasc`` benign (``malignant=`` changes the set). ``age``
and ``sex`` come from the manifest; ``age_band`` is derived from ``age`` (edges from the run).

CPU default: MONAI ResNet-18 at 64 × 64 (the pooled reference in ``shared/data/README.md`` reaches
AUC ≈ 0.87 there); ``network: resnet50`` or ``densenet121`` for studies. Malignant lesions are a
minority (~20 % in HAM10000), so ``class_weights`` may weight the cross-entropy: ``[w0, w1]``, or
``"balanced"``, i.e. ``w_c = N_s / (2 N_{s,c})`` from each site's own training labels. Per site,
not pooled: an OpenFL collaborator only sees its own manifest, so both runtimes train with the same
weights; under label skew (HAM10000's sites' training rows run from 0.7 % to 41 % malignant) each
site's gradient is then class-balanced on its own. A site whose training rows hold one class only
trains unweighted. The per-sample risk
used by fairness criteria stays the unweighted cross-entropy.

``prevalence_correction`` (with ``class_weights: balanced`` only) shifts each site's malignant logit
at prediction by ``logit(π_s) − logit(π)``: π_s is the site's own training prevalence, π the
federation's (``federation``: from the sites' training rows, in-process; or a number, which an
OpenFL plan must give, since a collaborator sees only its own rows). Per-site balanced weights
train every site as if its classes were 50/50, which removes the between-site prevalence a pooled
class-balanced model keeps (HAM10000's sites run from 0.7 % to 41 % malignant); the shift puts it
back, so the scores are those of pooled class-balanced training — one constant per site, the
ranking within a site unchanged. The task loss never sees it; the score-based fairness risks
(DP, EO) do, so FlexFair penalises the scores the audit measures.

``metadata_inputs: [age, sex]`` feeds the patient's metadata to the network as constant image
planes after the RGB channels (age / 100, clipped to [0, 1]; sex 0 female, 1 male; 0.5 where the
manifest has no value), the usual dermoscopy + metadata classifier at no architectural cost. It
matters at CPU sizes: a small network at 32 × 32 trained site by site barely separates lesions
from pixels alone, and age carries much of the malignancy signal. A model that reads age
directly is also the case a demographic-parity penalty over age bands has to correct.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Hashable, Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.transforms import Compose, MapTransform, Resized

from fedfair_med.data.federation import SiteData
from fedfair_med.data.manifest import HAM10000_BENIGN, HAM10000_MALIGNANT, Manifest, ManifestRow
from fedfair_med.contracts import CLASSIFICATION
from fedfair_med.tasks.base import TaskDefaults
from fedfair_med.tasks.imaging import (
    IMAGE, LABEL, EnsureChannelsd, ImagingTask, finish,
    load_rgb, to_unit_range,
)

METADATA_INPUTS = ("age", "sex")
_NAMED = {"benign": 0, "malignant": 1}


class MetadataPlanesd(MapTransform):
    """Append one constant plane per metadata input to the image (after augmentation)."""

    def __init__(self, inputs: Sequence[str]) -> None:
        super().__init__([IMAGE])
        self.inputs = tuple(inputs)

    @staticmethod
    def plane_value(name: str, value: Any) -> float:
        if name == "age":
            age = float(value) if isinstance(value, (int, float)) else math.nan
            return 0.5 if math.isnan(age) else min(max(age / 100.0, 0.0), 1.0)
        text = str(value).strip().lower()
        return {"male": 1.0, "m": 1.0, "female": 0.0, "f": 0.0}.get(text, 0.5)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[IMAGE]
        planes = [torch.full_like(image[:1], self.plane_value(n, d.get(n))) for n in self.inputs]
        d[IMAGE] = torch.cat([image, *planes], dim=0)
        return d


class SkinTask(ImagingTask):
    name = "skin"
    kind = CLASSIFICATION
    defaults = TaskDefaults(network="resnet18", image_size=(64, 64), batch_size=32, lr=1e-3,
                            rounds=10)

    def __init__(self) -> None:
        super().__init__()
        self.malignant: tuple[str, ...] = HAM10000_MALIGNANT
        self.class_weights_option: Any = None
        #: fixed ``[w0, w1]`` weights, or None (unweighted, or per site when ``balanced``)
        self.class_weights: torch.Tensor | None = None
        #: ``balanced``: each site's own weights, by site name
        self.site_class_weights: dict[str, torch.Tensor] = {}
        self.metadata_inputs: tuple[str, ...] = ()
        #: ``prevalence_correction``: None (off), "federation", or the federation's prevalence π
        self.prevalence_correction: str | float | None = None
        #: logit(π_s) − logit(π) per site name, set by after_load when the correction is on
        self.site_logit_offsets: dict[str, float] = {}

    @property  # type: ignore[override]
    def in_channels(self) -> int:
        return 3 + len(self.metadata_inputs)

    def configure(self, malignant: Sequence[str] | None = None, class_weights: Any = None,
                  metadata_inputs: Sequence[str] | None = None,
                  prevalence_correction: Any = None, **options: Any) -> None:
        super().configure(**options)
        self.prevalence_correction = _prevalence_option(prevalence_correction, class_weights)
        self.site_logit_offsets = {}
        if metadata_inputs is not None:
            names = [str(m).strip().lower() for m in (
                [metadata_inputs] if isinstance(metadata_inputs, str) else metadata_inputs)]
            unknown = sorted(set(names) - set(METADATA_INPUTS))
            if unknown or len(set(names)) != len(names):
                raise ValueError(f"task 'skin': metadata_inputs must be distinct names from "
                                 f"{list(METADATA_INPUTS)}, got {metadata_inputs!r}")
            self.metadata_inputs = tuple(names)
        if malignant is not None:
            self.malignant = tuple(str(m).strip().lower() for m in malignant)
        if class_weights is not None and class_weights != "balanced":
            weights = [float(w) for w in class_weights]
            if len(weights) != 2 or min(weights) <= 0:
                raise ValueError(f"task 'skin': class_weights must be 'balanced' or two positive "
                                 f"numbers [benign, malignant], got {class_weights!r}")
            class_weights = weights
        self.class_weights_option = class_weights
        self.class_weights = None
        self.site_class_weights = {}

    def apply_model_options(self, data: Mapping[str, Any]) -> None:
        if data.get("metadata_inputs") is not None:
            self.configure(metadata_inputs=data["metadata_inputs"])

    def parse_label(self, row: ManifestRow, manifest: Manifest) -> int:
        text = row.label.strip().lower()
        if text in ("0", "1"):
            return int(text)
        if text in _NAMED:
            return _NAMED[text]
        if text in self.malignant:
            return 1
        if text in HAM10000_BENIGN:
            return 0
        raise ValueError(
            f"{manifest.path}, row {row.line}: label {row.label!r} is not 0/1, benign/malignant or a "
            f"known diagnosis (malignant: {', '.join(self.malignant)}; benign: {', '.join(HAM10000_BENIGN)})"
        )

    def _common(self) -> list:
        return [
            load_rgb([IMAGE]),
            EnsureChannelsd(keys=[IMAGE], channels=3),
            to_unit_range(IMAGE),
            Resized(keys=[IMAGE], spatial_size=self.image_size, mode="area"),
        ]

    def train_transforms(self) -> Compose:
        return Compose([*self._common(), *self.augmentations([IMAGE]),
                        finish([IMAGE]), *self._metadata()])

    def eval_transforms(self) -> Compose:
        return Compose([*self._common(), finish([IMAGE]), *self._metadata()])

    def _metadata(self) -> list:
        return [MetadataPlanesd(self.metadata_inputs)] if self.metadata_inputs else []

    def after_load(self, sites: list[SiteData]) -> None:
        option = self.class_weights_option
        self.site_class_weights = {}
        self.class_weights = None
        counts: dict[str, tuple[int, int]] = {}
        if option == "balanced":
            for site in sites:
                labels = torch.tensor([int(record[LABEL]) for record in site.train.data], dtype=torch.long)
                self.site_class_weights[site.name] = balanced_weights(labels)
                counts[site.name] = (int(labels.sum()), len(labels))
        elif option is not None:
            self.class_weights = torch.tensor(option, dtype=torch.float32)
        self.site_logit_offsets = {}
        if self.prevalence_correction is not None:
            reference = self.prevalence_correction
            if reference == "federation":
                reference = _smoothed_prevalence(sum(p for p, _ in counts.values()),
                                                 sum(n for _, n in counts.values()))
            self.site_logit_offsets = {
                name: _logit(_smoothed_prevalence(*count)) - _logit(float(reference))
                for name, count in counts.items()}

    def site_logits(self, site: str | None, logits: torch.Tensor) -> torch.Tensor:
        offset = self.site_logit_offsets.get(site) if site is not None else None
        if offset is None:
            return logits
        return logits + torch.tensor([0.0, offset], dtype=logits.dtype, device=logits.device)

    def site_task_loss(self, site: str | None) -> Callable[[torch.Tensor, Mapping[str, Any]], torch.Tensor]:
        weights = self.site_class_weights.get(site)  # type: ignore[arg-type]
        if weights is None:
            return self.task_loss

        def loss(logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
            return weighted_cross_entropy(logits, batch, weights)
        return loss

    def task_loss(self, logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """Cross-entropy, weighted by fixed ``class_weights`` when set."""
        if self.class_weights is None:
            return super().task_loss(logits, batch)
        return weighted_cross_entropy(logits, batch, self.class_weights)


#: Why an OpenFL plan cannot say ``prevalence_correction: federation``.
PREVALENCE_NEEDS_A_NUMBER = (
    "data.prevalence_correction: 'federation' needs every site's training rows, and an OpenFL "
    "collaborator sees only its own: give the federation's training prevalence as a number, the "
    "sites' class-1 training rows over all their training rows (each site's `fedfair-med data "
    "check` prints both)")


def prevalence_from_all_sites(data: Mapping[str, Any]) -> bool:
    """True when ``data`` asks for the federation's prevalence to be computed from every site."""
    return _asks_for_federation(data.get("prevalence_correction"))


def _asks_for_federation(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() == "federation")


def _prevalence_option(value: Any, class_weights: Any) -> str | float | None:
    """Check ``prevalence_correction``: off, ``federation`` or a prevalence in (0, 1)."""
    if value is None or value is False:
        return None
    if class_weights != "balanced":
        raise ValueError("task 'skin': prevalence_correction puts back the site prevalence that "
                         "class_weights: balanced takes out; set class_weights: balanced, or drop "
                         f"prevalence_correction (got class_weights {class_weights!r})")
    if _asks_for_federation(value):
        return "federation"
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not 0.0 < number < 1.0:
        raise ValueError(f"task 'skin': prevalence_correction must be 'federation' or the "
                         f"federation's training prevalence, a number in (0, 1); got {value!r}")
    return number


def _smoothed_prevalence(positives: int, total: int) -> float:
    """(k + ½) / (n + 1): finite log-odds for a site with no malignant (or no benign) rows."""
    return (positives + 0.5) / (total + 1.0)


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def balanced_weights(labels: torch.Tensor) -> torch.Tensor:
    """``w_c = N / (2 N_c)``; ones when a class is absent (with one class, weights only rescale)."""
    counts = torch.bincount(labels, minlength=2)[:2].to(torch.float32)
    if bool((counts == 0).any()):
        return torch.ones(2)
    return counts.sum() / (2.0 * counts)


def weighted_cross_entropy(logits: torch.Tensor, batch: Mapping[str, Any], weights: torch.Tensor) -> torch.Tensor:
    weight = weights.to(device=logits.device, dtype=logits.dtype)
    return F.cross_entropy(logits, batch[LABEL].long(), weight=weight)
