"""The four clinical tasks on small real subsets: transforms, masks, MRI harmonisation, one round.

Real images come from ``../shared/data`` (or ``$FEDFAIR_SHARED_DATA``) through hand-written
manifests in ``tmp_path``; nothing is copied into the repository. Tests skip when it is absent.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from fedfair_med.config import RunConfig
from fedfair_med.data.manifest import write_manifest
from fedfair_med.runtime.local import run_simulation
from fedfair_med.tasks import build_task
from fedfair_med.tasks.fundus import FundusTask
from fedfair_med.tasks.imaging import masked_hard_dice
from fedfair_med.tasks.mri import MRITask
from fedfair_med.tasks.polyp import PolypTask
from fedfair_med.tasks.skin import SkinTask

SHARED = Path(os.environ.get("FEDFAIR_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_data = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared data folder {SHARED} is absent")


def realdata(test):
    """Mark a test that reads ``shared/data``; it is skipped when the folder is absent."""
    return pytest.mark.realdata(needs_data(test))


os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

TINY_UNET = {"channels": [4, 8]}


# ---- manifests over the shared data ------------------------------------------------------------
def _split(i: int, n_train: int) -> str:
    return "train" if i < n_train else "test"


def polyp_manifests(root: Path) -> list[Path]:
    kvasir = sorted((SHARED / "polyp/kvasir_seg_256/images").glob("*.jpg"))[:4]
    cvc = [SHARED / f"polyp/cvc_clinicdb_png/Original/{n}.png" for n in (1, 2, 3, 4)]
    return [
        write_manifest(root / "kvasir" / "manifest.csv", [
            {"id": p.stem, "image": p, "label": SHARED / "polyp/kvasir_seg_256/masks" / p.name,
             "split": _split(i, 2)} for i, p in enumerate(kvasir)]),
        write_manifest(root / "cvc" / "manifest.csv", [
            {"id": f"cvc-{p.stem}", "image": p, "label": SHARED / "polyp/cvc_clinicdb_png/Ground Truth" / p.name,
             "split": _split(i, 2)} for i, p in enumerate(cvc)]),
    ]


def fundus_fov(image: Path, out: Path) -> Path:
    """A real field-of-view mask: the camera aperture is where the red channel is not black."""
    red = np.asarray(Image.open(image).convert("RGB"))[..., 0]
    Image.fromarray(((red > 20) * 255).astype(np.uint8)).save(out)
    return out


def fundus_manifests(root: Path) -> list[Path]:
    chase = sorted((SHARED / "chasedb1/CHASEDB1").glob("Image_*.jpg"))[:4]
    stare = sorted((SHARED / "stare/images").glob("im*.png"))[:4]
    (root / "fov").mkdir(parents=True, exist_ok=True)
    return [
        # CHASE rows carry a FOV mask, STARE rows none: both paths of the masked loss are used.
        write_manifest(root / "chase" / "manifest.csv", [
            {"id": p.stem, "image": p, "label": p.with_name(f"{p.stem}_1stHO.png"),
             "fov": fundus_fov(p, root / "fov" / f"{p.stem}.png"), "split": _split(i, 2)}
            for i, p in enumerate(chase)]),
        write_manifest(root / "stare" / "manifest.csv", [
            {"id": p.stem, "image": p, "label": SHARED / "stare/labels-ah" / f"{p.stem}.ah.png",
             "split": _split(i, 2)} for i, p in enumerate(stare)]),
    ]


def skin_manifests(root: Path) -> list[Path]:
    """12 HAM10000 images, 6 from each of two acquisition sites, with both classes at each."""
    with open(SHARED / "ham10000/HAM10000_metadata.csv", newline="") as handle:
        meta = sorted(csv.DictReader(handle), key=lambda r: r["image_id"])
    out = []
    for site in ("vidir_modern", "rosendahl"):
        rows = [r for r in meta if r["dataset"] == site]
        malignant = [r for r in rows if r["dx"] in ("mel", "bcc", "akiec") and r["age"]][:2]
        benign = [r for r in rows if r["dx"] not in ("mel", "bcc", "akiec") and r["age"]][:3]
        unknown_age = [r for r in rows if not r["age"] and r["dx"] == "bkl"][:1]
        benign += unknown_age or [r for r in rows if r["dx"] == "nv"][3:4]
        chosen = [malignant[0], benign[0], benign[1], benign[2], malignant[1], benign[3]]
        out.append(write_manifest(root / site / "manifest.csv", [
            {"id": r["image_id"], "image": SHARED / "ham10000/images_200x150" / f"{r['image_id']}.jpg",
             "label": r["dx"], "split": _split(i, 4), "sex": r["sex"], "age": r["age"]}
            for i, r in enumerate(chosen)], attribute_names=("sex", "age")))
    return out


@pytest.fixture(scope="module")
def mri_manifests(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from fedfair_med.data.mri_sites import derive_mri_federation

    src = SHARED / "mri_abdomen_totalseg"
    return derive_mri_federation(src / "example_mr_sm.nii.gz", src / "example_seg_mr.nii.gz",
                                 tmp_path_factory.mktemp("mri"), sites=3, seed=0)


def run_one_round(task: str, data: dict, out: Path, **overrides) -> tuple:
    config = RunConfig(name=task, task=task, rounds=1, max_steps=2, batch_size=2, data=data,
                       network_kwargs=overrides.pop("network_kwargs", TINY_UNET), **overrides)
    result = run_simulation(config, out)
    for name in ("run.yaml", "metrics.jsonl", "predictions.csv", "model.pt"):
        assert (result.path / name).is_file(), name
    final = result.final
    values = [final["metric"], *(s["metric"] for s in final["sites"].values())]
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values), final
    logged = [json.loads(line) for line in (result.path / "metrics.jsonl").read_text().splitlines() if line]
    assert logged and logged[-1]["round"] == 1
    return result, final


# ---- polyp ---------------------------------------------------------------------------------------
@realdata
def test_polyp_samples_have_declared_shapes_and_binary_masks(tmp_path: Path) -> None:
    task = PolypTask()
    federation = task.load_federation(manifests=polyp_manifests(tmp_path), image_size=[48, 48])
    assert federation.site_names == ["kvasir", "cvc"]
    for site in federation.sites:
        for item in (site.train[0], site.test[1]):
            assert item["image"].shape == (3, 48, 48) and item["image"].dtype == torch.float32
            assert item["label"].shape == (1, 48, 48) and item["label"].dtype == torch.float32
            assert set(item["label"].unique().tolist()) == {0.0, 1.0}
            assert item["site"] == site.name and isinstance(item["id"], str)
        test_image = site.test[0]["image"]
        assert 0.0 <= float(test_image.min()) and float(test_image.max()) <= 1.0


@realdata
def test_jpeg_masks_are_thresholded_above_127(tmp_path: Path) -> None:
    """At native size (no resizing) the mask equals an independent PIL/numpy threshold."""
    manifest = polyp_manifests(tmp_path)[0]
    task = PolypTask()
    federation = task.load_federation(manifests=[manifest], image_size=256)
    row_mask = SHARED / "polyp/kvasir_seg_256/masks" / f"{federation.sites[0].test[0]['id']}.jpg"
    raw = np.asarray(Image.open(row_mask).convert("RGB")).astype(np.float64).mean(-1)
    assert ((raw > 0) & (raw < 255)).any(), "the JPEG mask should have compression grey levels"
    got = federation.sites[0].test[0]["label"][0].numpy()
    np.testing.assert_array_equal(got, (raw > 127).astype(np.float32))


@realdata
def test_polyp_training_augmentation_changes_colour_not_mask_values(tmp_path: Path) -> None:
    task = PolypTask()
    federation = task.load_federation(manifests=polyp_manifests(tmp_path), image_size=32, seed=3)
    draws = [federation.sites[0].train[0] for _ in range(6)]
    assert any(not torch.allclose(draws[0]["image"], d["image"]) for d in draws[1:])
    assert all(set(d["label"].unique().tolist()) <= {0.0, 1.0} for d in draws)


def _flips_and_rotations(image: torch.Tensor) -> list[torch.Tensor]:
    """The eight flips and right-angle rotations of an image's last two axes."""
    turned = [torch.rot90(image, k, dims=(-2, -1)) for k in range(4)]
    return turned + [torch.flip(t, dims=(-1,)) for t in turned]


@realdata
@pytest.mark.parametrize("task_class, manifests", [(PolypTask, polyp_manifests),
                                                   (FundusTask, fundus_manifests),
                                                   (SkinTask, skin_manifests)])
def test_the_augmentation_option_keeps_colour_or_every_pixel(tmp_path: Path, task_class, manifests) -> None:
    """``geometric`` only moves pixels (every draw is a flip/rotation of the evaluation image),
    ``none`` gives the evaluation image itself, ``full`` (the default) also changes colours."""
    draws: dict[str, list[torch.Tensor]] = {}
    for option in ("full", "geometric", "none"):
        task = task_class()
        options = {} if option == "full" else {"augmentation": option}
        site = task.load_federation(manifests=manifests(tmp_path / option), image_size=32, seed=3,
                                    **options).sites[0]
        plain = task.eval_transforms()(dict(site.train.data[0]))["image"]
        draws[option] = [site.train[0]["image"] for _ in range(8)]
        moved = _flips_and_rotations(plain)
        in_place = [any(torch.equal(d, m) for m in moved) for d in draws[option]]
        if option == "none":
            assert all(torch.equal(d, plain) for d in draws[option])
        elif option == "geometric":
            assert all(in_place) and any(not torch.equal(d, plain) for d in draws[option])
        else:
            assert not all(in_place)


@realdata
def test_mri_augmentation_none_trains_on_the_volumes_own_slices(mri_manifests: list[Path]) -> None:
    """MRI has no geometric augmentation: ``none`` and ``geometric`` leave a drawn slice as it
    is in the harmonised volume, ``full`` changes its intensities."""
    from monai.transforms import Compose

    for option, unchanged in (("none", True), ("geometric", True), ("full", False)):
        task = MRITask()
        site = task.load_federation(manifests=mri_manifests, slices_per_volume=4, foreground_fraction=1.0,
                                    augmentation=option, seed=1).sites[0]
        volume = Compose(task.volume_transforms())(dict(site.train.base.data[0]))["image"].as_tensor()
        slices = [volume[..., z].float() for z in range(volume.shape[-1])]
        found = [any(torch.equal(site.train[0]["image"], s) for s in slices) for _ in range(4)]
        assert all(found) if unchanged else not all(found), (option, found)


@realdata
def test_cached_dataset_gives_the_same_samples(tmp_path: Path) -> None:
    manifests = polyp_manifests(tmp_path)
    plain = PolypTask().load_federation(manifests=manifests, image_size=32)
    cached = PolypTask().load_federation(manifests=manifests, image_size=32, cache=True)
    for a, b in zip(plain.sites, cached.sites):
        torch.testing.assert_close(a.test[1]["image"], b.test[1]["image"])
        torch.testing.assert_close(a.test[1]["label"], b.test[1]["label"])


@realdata
def test_polyp_one_federated_round_is_reproducible(tmp_path: Path) -> None:
    data = {"manifests": [str(p) for p in polyp_manifests(tmp_path / "m")], "image_size": [32, 32]}
    result, final = run_one_round("polyp", data, tmp_path / "run")
    assert set(final["sites"]) == {"kvasir", "cvc"}
    assert len(result.predictions) == 4
    again, _ = run_one_round("polyp", data, tmp_path / "run-again")
    # Seeded MONAI augmentation + seeded loaders: the same configuration gives the same numbers.
    assert result.predictions["score"].tolist() == again.predictions["score"].tolist()


@realdata
@pytest.mark.parametrize("cache", [False, True])
def test_background_prefetching_gives_bit_identical_training(tmp_path: Path, monkeypatch, cache: bool) -> None:
    """Batches prepared in a thread (random augmentation included) are the same batches."""
    data = {"manifests": [str(p) for p in polyp_manifests(tmp_path / "m")], "image_size": [32, 32],
            "cache": cache}
    models = {}
    for setting in ("0", "1"):
        monkeypatch.setenv("FEDFAIR_PREFETCH", setting)
        config = RunConfig(name="p", task="polyp", rounds=2, batch_size=2, data=data,
                           network_kwargs=TINY_UNET)
        models[setting] = run_simulation(config, tmp_path / f"run-{setting}").state
    assert models["0"].keys() == models["1"].keys()
    assert all(torch.equal(models["0"][k], models["1"][k]) for k in models["0"])


# ---- fundus --------------------------------------------------------------------------------------
@realdata
def test_fundus_fov_is_loaded_and_defaults_to_whole_image(tmp_path: Path) -> None:
    task = FundusTask()
    federation = task.load_federation(manifests=fundus_manifests(tmp_path), image_size=64)
    chase, stare = federation.sites
    fov = chase.test[0]["fov"]
    assert fov.shape == (1, 64, 64) and set(fov.unique().tolist()) == {0.0, 1.0}
    assert 0.3 < float(fov.mean()) < 0.95  # a real aperture: inside counts, the corners do not
    assert torch.equal(stare.test[0]["fov"], torch.ones(1, 64, 64))
    assert chase.test[0]["label"].shape == (1, 64, 64)
    assert set(chase.test[0]["label"].unique().tolist()) == {0.0, 1.0}


def test_fov_excludes_pixels_from_metric_and_loss() -> None:
    task = FundusTask()
    label = torch.zeros(2, 1, 8, 8)
    label[:, :, 2:6, 2:6] = 1.0
    fov = torch.zeros(2, 1, 8, 8)
    fov[:, :, 1:7, 1:7] = 1.0
    logits = torch.where(label > 0, 5.0, -5.0)
    wrong_outside = logits.clone()
    wrong_outside[:, :, 0, :] = 5.0  # predicted vessel on the border, outside the FOV
    with_fov = {"label": label, "fov": fov}
    assert torch.allclose(task.sample_metric(wrong_outside, with_fov), torch.ones(2, dtype=torch.float64))
    assert (task.sample_metric(wrong_outside, {"label": label}) < 0.95).all()
    # Loss: logits outside the FOV do not matter at all.
    shifted = logits.clone()
    shifted[fov == 0] = torch.randn(int((fov == 0).sum()))
    assert torch.allclose(task.task_loss(logits, with_fov), task.task_loss(shifted, with_fov))
    assert torch.allclose(task.sample_loss(logits, with_fov), task.sample_loss(shifted, with_fov))
    assert not torch.allclose(task.task_loss(logits, {"label": label}), task.task_loss(shifted, {"label": label}))
    # All-ones FOV is the same as no FOV.
    ones = {"label": label, "fov": torch.ones_like(fov)}
    assert torch.allclose(task.sample_metric(wrong_outside, ones), task.sample_metric(wrong_outside, {"label": label}))
    assert torch.allclose(masked_hard_dice(wrong_outside, label, torch.ones_like(fov)),
                          task.sample_metric(wrong_outside, {"label": label}))


@realdata
def test_fundus_one_federated_round(tmp_path: Path) -> None:
    data = {"manifests": [str(p) for p in fundus_manifests(tmp_path / "m")], "image_size": 32}
    result, final = run_one_round("fundus", data, tmp_path / "run")
    assert set(final["sites"]) == {"chase", "stare"}
    assert len(result.predictions) == 4


# ---- skin -------------------------------------------------------------------------------------------
@realdata
def test_skin_labels_attributes_and_missing_age(tmp_path: Path) -> None:
    task = SkinTask()
    federation = task.load_federation(manifests=skin_manifests(tmp_path), class_weights="balanced")
    assert federation.site_names == ["vidir_modern", "rosendahl"]
    assert federation.attributes == ("sex", "age", "age_band")
    for site in federation.sites:
        labels = [site.train[i]["label"] for i in range(len(site.train))]
        assert set(labels) == {0, 1} and all(isinstance(v, int) for v in labels)
        item = site.train[0]
        assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
        assert item["sex"] in ("male", "female", "")
    bands = federation.sites[0].test.attribute_values("age_band")
    ages = federation.sites[0].test.attribute_values("age")
    assert "" in ages and "" in bands  # the HAM10000 image without age is reported as missing
    for age, band in zip(ages, bands):
        assert band == ("" if age == "" else (">60" if float(age) > 60 else "<=60"))
    assert set(federation.group_vocabulary("age_band")) <= {"<=60", ">60"}
    # 'balanced' weights w_c = N_s / (2 N_{s,c}) from each site's own training labels.
    assert task.class_weights is None
    for site in federation.sites:
        labels = [int(r["label"]) for r in site.train.data]
        n, n1 = len(labels), sum(labels)
        torch.testing.assert_close(task.site_class_weights[site.name],
                                   torch.tensor([n / (2 * (n - n1)), n / (2 * n1)]))


@realdata
def test_skin_balanced_weights_are_each_sites_own_in_either_runtime(tmp_path: Path) -> None:
    """A site trains with the weights its own labels give, whether the process loaded every site
    (in-process) or only its own manifest (an OpenFL collaborator); the loss uses them."""
    from fedfair_med.fairness.criteria import Criterion
    from fedfair_med.tasks.skin import balanced_weights

    images = sorted((SHARED / "ham10000/images_200x150").glob("ISIC_00243*.jpg"))[:6]
    skewed = write_manifest(tmp_path / "skewed" / "manifest.csv", [  # 1 malignant in 5 (others 1 in 4)
        {"id": f"s{i}", "image": image, "label": "mel" if i == 0 else "nv", "split": "train" if i < 5 else "test",
         "sex": "male", "age": "50"} for i, image in enumerate(images)], attribute_names=("sex", "age"))
    manifests = [*skin_manifests(tmp_path), skewed]
    together = SkinTask()
    together.load_federation(manifests=manifests, class_weights="balanced")
    for manifest in manifests:
        alone = SkinTask()
        site = alone.load_federation(manifests=[manifest], class_weights="balanced").sites[0]
        torch.testing.assert_close(alone.site_class_weights[site.name],
                                   together.site_class_weights[site.name])
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3], [-1.0, 1.0]])
    batch = {"label": torch.tensor([0, 1, 1]), "group": torch.zeros(3, dtype=torch.long)}
    for name, weights in together.site_class_weights.items():
        loss = together.objective(Criterion("dp", "sex"), site=name).task_loss(logits, batch)
        expected = torch.nn.functional.cross_entropy(logits, batch["label"], weight=weights)
        torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(together.site_class_weights["skewed"], torch.tensor([5 / 8, 5 / 2]))
    assert not torch.equal(together.site_class_weights["skewed"], together.site_class_weights["rosendahl"])
    # A site holding one class trains unweighted: the weights would only rescale its loss.
    torch.testing.assert_close(balanced_weights(torch.tensor([0, 0, 0])), torch.ones(2))


def _skewed_skin_manifest(root: Path) -> Path:
    """A site of 5 training rows, 1 malignant (π_s = (1 + ½) / (5 + 1) = ¼ smoothed), 1 test row."""
    images = sorted((SHARED / "ham10000/images_200x150").glob("ISIC_00243*.jpg"))[:6]
    return write_manifest(root / "skewed" / "manifest.csv", [
        {"id": f"s{i}", "image": image, "label": "mel" if i == 0 else "nv",
         "split": "train" if i < 5 else "test", "sex": "male", "age": "50"}
        for i, image in enumerate(images)], attribute_names=("sex", "age"))


@realdata
def test_skin_prevalence_correction_shifts_each_sites_logit_by_its_prior_odds(tmp_path: Path) -> None:
    """logit(π_s) − logit(π): a known answer for a given π, the federation's π from every
    site's training rows, the same offset whichever way the sites were loaded."""
    skewed = _skewed_skin_manifest(tmp_path)
    task = SkinTask()
    task.load_federation(manifests=[skewed], class_weights="balanced", prevalence_correction=0.5)
    assert task.site_logit_offsets["skewed"] == pytest.approx(-math.log(3.0))  # logit(1/4)
    logits = torch.tensor([[0.0, 0.0], [1.0, -2.0], [-1.0, 3.0]])
    shifted = task.site_logits("skewed", logits)
    torch.testing.assert_close(task.positive_probability(shifted)[0], torch.tensor(0.25))
    torch.testing.assert_close(shifted[:, 0], logits[:, 0])  # only the malignant logit moves
    assert torch.equal(task.site_logits("another site", logits), logits)
    # The DP/EO risk FlexFair penalises is the corrected score; the task loss is the model's own.
    from fedfair_med.fairness.criteria import Criterion

    batch = {"label": torch.tensor([0, 1, 1]), "group": torch.zeros(3, dtype=torch.long)}
    for criterion in (Criterion("dp", "sex"), Criterion("eo", "sex")):
        objective = task.objective(criterion, site="skewed")
        torch.testing.assert_close(objective.sample_risk(logits, batch),
                                   torch.softmax(shifted, dim=1)[:, 1])
        torch.testing.assert_close(objective.task_loss(logits, batch), torch.nn.functional.cross_entropy(
            logits, batch["label"], weight=task.site_class_weights["skewed"]))
    torch.testing.assert_close(task.objective(Criterion("dp", "sex")).sample_risk(logits, batch),
                               torch.softmax(logits, dim=1)[:, 1])  # no site: no correction

    manifests = [*skin_manifests(tmp_path / "two"), skewed]
    together = SkinTask()
    federation = together.load_federation(manifests=manifests, class_weights="balanced",
                                          prevalence_correction="federation")
    counts = {s.name: ([int(r["label"]) for r in s.train.data]) for s in federation.sites}
    everyone = [y for labels in counts.values() for y in labels]
    pi = (sum(everyone) + 0.5) / (len(everyone) + 1)
    for name, labels in counts.items():
        pi_s = (sum(labels) + 0.5) / (len(labels) + 1)
        expected = math.log(pi_s / (1 - pi_s)) - math.log(pi / (1 - pi))
        assert together.site_logit_offsets[name] == pytest.approx(expected)
    # An OpenFL collaborator loads its own manifest alone, with π given as a number: same offset.
    alone = SkinTask()
    alone.load_federation(manifests=[skewed], class_weights="balanced", prevalence_correction=pi)
    assert alone.site_logit_offsets["skewed"] == pytest.approx(together.site_logit_offsets["skewed"])


@realdata
def test_skin_prevalence_correction_moves_predictions_not_training(tmp_path: Path) -> None:
    """Same seed with and without the correction: the same trained model (training never sees
    it), and every prediction's log-odds moved by its site's offset, so the ranking within a
    site is unchanged."""
    data = {"manifests": [str(p) for p in [*skin_manifests(tmp_path / "m"),
                                            _skewed_skin_manifest(tmp_path / "m")]],
            "image_size": 32, "class_weights": "balanced"}
    plain, _ = run_one_round("skin", data, tmp_path / "plain", network="small_cnn",
                             network_kwargs={"width": 4})
    corrected, _ = run_one_round("skin", {**data, "prevalence_correction": "federation"},
                                 tmp_path / "corrected", network="small_cnn",
                                 network_kwargs={"width": 4})
    for name, tensor in plain.state.items():
        assert torch.equal(tensor, corrected.state[name]), name
    task = SkinTask()
    task.load_federation(manifests=data["manifests"], class_weights="balanced",
                         prevalence_correction="federation")
    merged = plain.predictions.merge(corrected.predictions, on=["id", "site"], suffixes=("", "_c"))
    assert len(merged) == len(plain.predictions) > 0
    odds = lambda p: np.log(p / (1 - p))  # noqa: E731
    moved = odds(merged["score_c"]) - odds(merged["score"])
    expected = merged["site"].map(task.site_logit_offsets)
    np.testing.assert_allclose(moved, expected, atol=1e-4)
    assert (merged["y_pred_c"] == (merged["score_c"] >= 0.5).astype(int)).all()


def test_skin_prevalence_correction_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match="class_weights: balanced"):
        SkinTask().configure(prevalence_correction="federation")
    with pytest.raises(ValueError, match=r"number in \(0, 1\)"):
        SkinTask().configure(class_weights="balanced", prevalence_correction=1.5)
    with pytest.raises(ValueError, match=r"'federation' or"):
        SkinTask().configure(class_weights="balanced", prevalence_correction="pooled")
    from fedfair_med.runtime.openfl.workspace import FederationError, render_plan

    with pytest.raises(FederationError, match="collaborator sees only its own"):
        render_plan("fedavg", task="skin", sites=["a", "b"], overrides={
            "data": {"class_weights": "balanced", "prevalence_correction": "federation"}})
    plan = render_plan("fedavg", task="skin", sites=["a", "b"], overrides={  # a number is fine
        "data": {"class_weights": "balanced", "prevalence_correction": 0.19}})
    assert plan.config.data["prevalence_correction"] == 0.19


@realdata
def test_skin_label_names_and_errors(tmp_path: Path) -> None:
    images = sorted((SHARED / "ham10000/images_200x150").glob("ISIC_00243*.jpg"))[:4]
    manifest = write_manifest(tmp_path / "s" / "manifest.csv", [
        {"id": "a", "image": images[0], "label": "mel", "split": "train"},
        {"id": "b", "image": images[1], "label": "nv", "split": "test"},
        {"id": "c", "image": images[2], "label": "malignant", "split": "test"},
        {"id": "d", "image": images[3], "label": "1", "split": "test"},
    ])
    image = images[0]
    federation = SkinTask().load_federation(manifests=[manifest])
    assert [r["label"] for r in federation.sites[0].test.data] == [0, 1, 1]
    assert federation.sites[0].train.data[0]["label"] == 1
    bad = write_manifest(tmp_path / "bad" / "manifest.csv", [
        {"id": "a", "image": image, "label": "tumour?", "split": "train"},
        {"id": "b", "image": images[1], "label": "nv", "split": "test"}])
    with pytest.raises(ValueError, match=r"bad.*manifest.csv.*row 2.*tumour"):
        SkinTask().load_federation(manifests=[bad])


@realdata
def test_skin_one_federated_round(tmp_path: Path) -> None:
    data = {"manifests": [str(p) for p in skin_manifests(tmp_path / "m")], "image_size": 32}
    result, final = run_one_round("skin", data, tmp_path / "run", network="small_cnn",
                                  network_kwargs={"width": 4}, attribute="sex", criterion="dp")
    assert len(result.predictions) == 4
    assert set(result.predictions["sex"].astype(str)) <= {"male", "female", ""}


@realdata
def test_skin_metadata_inputs_are_constant_planes_after_rgb(tmp_path: Path) -> None:
    task = SkinTask()
    federation = task.load_federation(manifests=skin_manifests(tmp_path), image_size=32,
                                      metadata_inputs=["age", "sex"])
    assert task.in_channels == 5
    seen_missing_age = False
    for site in federation.sites:
        for split in (site.train, site.test):
            for i in range(len(split)):
                item = split[i]
                image = item["image"]
                assert image.shape == (5, 32, 32)
                age_plane, sex_plane = image[3], image[4]
                assert torch.all(age_plane == age_plane[0, 0]) and torch.all(sex_plane == sex_plane[0, 0])
                age = item["age"]
                if isinstance(age, float) and math.isnan(age):
                    seen_missing_age = True
                    assert float(age_plane[0, 0]) == 0.5
                else:
                    assert float(age_plane[0, 0]) == pytest.approx(min(float(age) / 100, 1.0))
                assert float(sex_plane[0, 0]) == {"male": 1.0, "female": 0.0}.get(item["sex"], 0.5)
    assert seen_missing_age  # the HAM10000 image without age gets the neutral 0.5
    # The RGB channels are untouched: same pixels as without metadata (eval transforms).
    plain = SkinTask().load_federation(manifests=skin_manifests(tmp_path / "plain"), image_size=32)
    torch.testing.assert_close(federation.sites[0].test[0]["image"][:3], plain.sites[0].test[0]["image"])


def test_skin_metadata_inputs_shape_the_network_without_data_and_bad_names_are_refused() -> None:
    from fedfair_med.runtime.setup import build_global_model

    config = RunConfig(task="skin", network="small_cnn", network_kwargs={"width": 4},
                       data={"metadata_inputs": ["age", "sex"]})
    model = build_global_model(config, SkinTask())  # the aggregator: no manifest loaded
    assert next(model.parameters()).shape[1] == 5
    with pytest.raises(ValueError, match="metadata_inputs"):
        SkinTask().configure(metadata_inputs=["age", "weight"])


@realdata
def test_skin_one_federated_round_with_metadata_inputs(tmp_path: Path) -> None:
    data = {"manifests": [str(p) for p in skin_manifests(tmp_path / "m")], "image_size": 32,
            "metadata_inputs": ["age", "sex"]}
    result, final = run_one_round("skin", data, tmp_path / "run", network="small_cnn",
                                  network_kwargs={"width": 4}, attribute="age_band", criterion="dp",
                                  method="flexfair")
    assert torch.load(result.path / "model.pt")["0.weight"].shape[1] == 5


# ---- MRI -------------------------------------------------------------------------------------------
@realdata
def test_derived_mri_sites_differ_in_orientation_resolution_and_intensity(mri_manifests: list[Path]) -> None:
    codes, zooms, means = set(), set(), []
    for manifest in mri_manifests:
        images = sorted((manifest.parent / "images").glob("*.nii.gz"))
        assert len(images) == 4
        first = nib.load(str(images[0]))
        codes.add(nib.aff2axcodes(first.affine))
        zooms.add(tuple(np.round(first.header.get_zooms(), 2)))
        means.append(float(np.asarray(first.dataobj).mean()))
        label = np.asarray(nib.load(str(manifest.parent / "labels" / images[0].name)).dataobj)
        assert set(np.unique(label).tolist()) == {0, 1} and label.shape == first.shape
        rows = manifest.read_text().splitlines()
        assert sum(",test" in r for r in rows) == 1 and sum(",train" in r for r in rows) == 3
    assert len(codes) == 3 and len(zooms) == 3
    assert max(means) / min(means) > 1.5


@realdata
def test_mri_orientation_normalisation_undoes_a_flip(tmp_path: Path, mri_manifests: list[Path]) -> None:
    src_image = mri_manifests[0].parent / "images" / "mri-site-a-vol0.nii.gz"
    src_label = mri_manifests[0].parent / "labels" / "mri-site-a-vol0.nii.gz"
    records = []
    for tag, flip in (("orig", False), ("flipped", True)):
        paths = []
        for src in (src_image, src_label):
            img = nib.load(str(src))
            array, affine = np.asarray(img.dataobj), img.affine.copy()
            if flip:  # same anatomy, stored mirrored along x, the affine says so
                array = array[::-1].copy()
                affine = affine @ np.array([[-1, 0, 0, array.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
            path = tmp_path / f"{tag}-{src.name}"
            nib.save(nib.Nifti1Image(array, affine), str(path))
            paths.append(path)
        records.append({"image": str(paths[0]), "label": str(paths[1]), "id": tag, "site": "s"})
    raw = [np.asarray(nib.load(r["image"]).dataobj) for r in records]
    assert not np.allclose(raw[0], raw[1])
    transform = MRITask().eval_transforms()
    a, b = transform(dict(records[0])), transform(dict(records[1]))
    torch.testing.assert_close(a["image"], b["image"])
    torch.testing.assert_close(a["label"], b["label"])


@realdata
def test_nibabel_and_simpleitk_readers_agree(mri_manifests: list[Path]) -> None:
    """Same array and same physical orientation from both readers (permuted, flipped site c)."""
    manifest = mri_manifests[2]
    out = {}
    for reader in ("nibabel", "simpleitk"):
        task = MRITask()
        federation = task.load_federation(manifests=[manifest], reader=reader)
        out[reader] = federation.sites[0].test[0]
    torch.testing.assert_close(out["nibabel"]["image"], out["simpleitk"]["image"])
    torch.testing.assert_close(out["nibabel"]["label"], out["simpleitk"]["label"])
    from monai.transforms import LoadImage

    from fedfair_med.tasks.mri import SimpleITKReader

    path = manifest.parent / "images" / "mri-site-c-vol0.nii.gz"
    nib_img = LoadImage(reader="NibabelReader", image_only=True)(path)
    itk_img = LoadImage(reader=SimpleITKReader(), image_only=True)(path)
    np.testing.assert_allclose(nib_img.numpy(), itk_img.numpy())
    np.testing.assert_allclose(nib_img.affine.numpy(), itk_img.affine.numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="unknown reader"):
        MRITask().load_federation(manifests=[manifest], reader="dicom-magic")


def test_readers_agree_on_a_big_endian_nibabel_test_volume() -> None:
    """nibabel's own test volume (LAS, big-endian int16): both readers give one array and affine."""
    from monai.transforms import LoadImage

    from fedfair_med.tasks.mri import SimpleITKReader

    data_path = pytest.importorskip("nibabel.testing").data_path
    path = Path(data_path) / "anatomical.nii"
    if not path.is_file():
        pytest.skip("nibabel test data not installed")
    by_nibabel = LoadImage(reader="NibabelReader", image_only=True)(path)
    by_sitk = LoadImage(reader=SimpleITKReader(), image_only=True)(path)
    assert by_nibabel.shape == (33, 41, 25)
    np.testing.assert_array_equal(by_nibabel.numpy(), by_sitk.numpy())
    np.testing.assert_allclose(by_nibabel.affine.numpy(), by_sitk.affine.numpy(), atol=1e-4)


@realdata
def test_mri_trains_on_slices_and_evaluates_whole_volumes(mri_manifests: list[Path]) -> None:
    task = MRITask()
    federation = task.load_federation(manifests=mri_manifests, slices_per_volume=3, foreground_fraction=1.0)
    site = federation.sites[1]
    assert len(site.train) == 3 * 3 and len(site.test) == 1
    slice_item = site.train[0]
    assert slice_item["image"].shape == (1, 64, 64) and slice_item["label"].sum() > 0
    volume = site.test[0]
    assert volume["image"].ndim == 4 and volume["image"].shape[:3] == (1, 64, 64)
    assert volume["fov"].shape == volume["label"].shape == volume["image"].shape
    real_slices = volume["fov"][0, 0, 0]
    assert real_slices.sum() >= 8 and (volume["label"][..., real_slices == 0] == 0).all()
    model = task.build_model(**TINY_UNET)
    model.eval()
    with torch.no_grad():
        logits = model(volume["image"][None])
        per_slice = torch.stack([model(volume["image"][None, ..., z]) for z in range(volume["image"].shape[-1])], -1)
    assert logits.shape == (1, 1, *volume["image"].shape[1:])
    torch.testing.assert_close(logits, per_slice)


@realdata
def test_mri_one_federated_round_gives_one_dice_per_volume(tmp_path: Path, mri_manifests: list[Path]) -> None:
    data = {"manifests": [str(p) for p in mri_manifests], "slices_per_volume": 2}
    result, final = run_one_round("mri", data, tmp_path / "run")
    assert len(result.predictions) == 3  # one test volume per site
    assert sorted(result.predictions["id"]) == ["mri-site-a-vol3", "mri-site-b-vol3", "mri-site-c-vol3"]


# ---- errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["polyp", "fundus", "mri", "skin"])
def test_load_federation_errors_name_the_manifest(tmp_path: Path, name: str) -> None:
    task = build_task(name)
    with pytest.raises(ValueError, match="no site manifests"):
        task.load_federation()
    broken = tmp_path / "hospital" / "manifest.csv"
    broken.parent.mkdir()
    broken.write_text("id,image,split\na,x.png,train\n")
    with pytest.raises(ValueError, match=r"hospital/manifest.csv.*label"):
        task.load_federation(manifests=[broken])
    with pytest.raises(ValueError, match=r"missing.csv"):
        task.load_federation(manifests=[tmp_path / "missing.csv"])
    absent = write_manifest(tmp_path / "absent" / "manifest.csv", [
        {"id": "a", "image": tmp_path / "nope.png", "label": "0", "split": "train"}])
    with pytest.raises(ValueError, match=r"absent/manifest.csv, row \d+: image .*nope.png not found"):
        task.load_federation(manifests=[absent])
