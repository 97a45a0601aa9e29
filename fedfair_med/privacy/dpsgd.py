r"""DP-SGD for a site's local training through Opacus (Abadi et al. 2016, "Deep learning with
differential privacy"; Yousefpour et al. 2021, "Opacus").

Each optimiser step of DP-SGD clips every per-sample gradient to L2 norm ≤ C, sums them, adds
N(0, (z C)² I) and divides by the expected batch size; batches are Poisson samples (each sample
joins with probability q = 1 / steps-per-epoch), which is what Opacus' RDP accountant for the
subsampled Gaussian mechanism assumes. The accountant lives at the site and spans all its rounds.

Per-sample gradients cannot exist with BatchNorm (it mixes samples in a batch and keeps running
statistics as buffers), so when DP-SGD is on the network is converted at build time with
``opacus.validators.ModuleValidator.fix`` (BatchNorm → GroupNorm) — every site and the server
build the same converted architecture — or refused with a clear message.

A Poisson draw can be empty. Skipping it would reveal that no sample was drawn, so an empty
draw still takes a noise-only optimiser step (zero clipped gradient plus noise).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from fedfair_med.privacy.settings import DPSGDSettings

# Opacus hooks the first layer, whose input never requires grad; torch warns about it each step.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")


def make_dp_compatible(model: nn.Module) -> nn.Module:
    """``model`` with BatchNorm → GroupNorm (and Opacus' other fixes), or ValueError if impossible."""
    from opacus.grad_sample import GradSampleModule
    from opacus.validators import ModuleValidator

    fixed = ModuleValidator.fix(model) if ModuleValidator.validate(model, strict=False) else model
    problems = [str(e) for e in ModuleValidator.validate(fixed, strict=False)]
    problems += [str(e) for e in GradSampleModule.validate(fixed, strict=False)]
    if problems:
        raise ValueError(
            "DP-SGD: this network cannot be trained with per-sample gradients even after "
            "Opacus' automatic fixes (BatchNorm → GroupNorm); choose another network or turn "
            "privacy.dp_sgd off. Problems: " + " | ".join(problems)
        )
    return fixed


class PoissonBatches:
    """Poisson-sampled batches of ``dataset``: each sample joins each batch with probability q."""

    def __init__(self, dataset: Any, sample_rate: float, collate_fn: Callable[[list], Any],
                 generator: torch.Generator, on_empty: Callable[[], None]) -> None:
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        self.dataset, self.collate_fn, self.on_empty = dataset, collate_fn, on_empty
        self.sampler = UniformWithReplacementSampler(
            num_samples=len(dataset), sample_rate=sample_rate, generator=generator)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        for indices in self.sampler:
            if not indices:
                self.on_empty()
                continue
            yield self.collate_fn([self.dataset[i] for i in indices])


class SiteDPSGD:
    """One site's DP-SGD: wraps a round's training and keeps the site's accountant across rounds."""

    def __init__(self, settings: DPSGDSettings) -> None:
        from opacus.accountants import RDPAccountant

        self.settings = settings
        self.accountant = RDPAccountant()

    def session(self, noise_seed: int, sampling_seed: int) -> "DPSGDSession":
        return DPSGDSession(self, noise_seed, sampling_seed)

    @property
    def steps(self) -> int:
        return sum(steps for _z, _q, steps in self.accountant.history)

    def epsilon(self) -> float:
        """ε spent so far at the configured δ (0 before any step)."""
        if not self.accountant.history:
            return 0.0
        return float(self.accountant.get_epsilon(self.settings.delta))


class DPSGDSession:
    """The hook the shared local loop calls: :meth:`attach` before training, :meth:`detach` after."""

    def __init__(self, site: SiteDPSGD, noise_seed: int, sampling_seed: int) -> None:
        self.site, self.noise_seed, self.sampling_seed = site, noise_seed, sampling_seed

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer,
               loader: Any) -> tuple[nn.Module, torch.optim.Optimizer, PoissonBatches]:
        """Per-sample gradients on ``model``, clipping + noise in ``optimizer``, Poisson batches."""
        from opacus.grad_sample import GradSampleModule
        from opacus.optimizers import DPOptimizer

        dataset = loader.dataset
        steps_per_epoch = max(len(loader), 1)
        sample_rate = 1.0 / steps_per_epoch
        wrapped = GradSampleModule(model, loss_reduction="mean", strict=True)
        # Opacus draws the noise where the parameters live: a CUDA model needs a CUDA generator
        # (on the CPU this is the same generator as before, so the numbers are unchanged).
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        noise = torch.Generator(device=device)
        noise.manual_seed(self.noise_seed)
        dp_optimizer = DPOptimizer(
            optimizer, noise_multiplier=self.site.settings.noise_multiplier,
            max_grad_norm=self.site.settings.max_grad_norm,
            expected_batch_size=max(1, round(sample_rate * len(dataset))),
            loss_reduction="mean", generator=noise,
        )
        dp_optimizer.attach_step_hook(self.site.accountant.get_optimizer_hook_fn(sample_rate))
        sampling = torch.Generator()
        sampling.manual_seed(self.sampling_seed)
        params = [p for p in model.parameters() if p.requires_grad]

        def noise_only_step() -> None:
            dp_optimizer.zero_grad(set_to_none=True)
            for p in params:
                p.grad_sample = torch.zeros((1, *p.shape), dtype=p.dtype, device=p.device)
            dp_optimizer.step()

        batches = PoissonBatches(dataset, sample_rate, loader.collate_fn, sampling, noise_only_step)
        self._wrapped, self._optimizer = wrapped, dp_optimizer
        return wrapped, dp_optimizer, batches

    def detach(self, model: nn.Module) -> nn.Module:
        """The plain model again: hooks removed and per-sample gradients dropped."""
        self._optimizer.zero_grad(set_to_none=True)
        module = model._module if hasattr(model, "_module") else model
        self._wrapped.remove_hooks()
        for p in module.parameters():
            for name in ("grad_sample", "summed_grad", "_forward_counter"):
                if hasattr(p, name):
                    delattr(p, name)
        return module
