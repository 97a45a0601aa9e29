"""Where a site computes and in which precision: device resolution, autocast, the doctor line.

A hospital's GPU runs the local work (model, batches, optimiser state, a method's per-site
state); what crosses the wire and the server's float64 aggregation stay on the CPU, so the wire
format and the aggregation's bits do not depend on any site's hardware. On CPU with precision 32
nothing here changes a number: every helper is then the identity.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from typing import Any, ContextManager

import torch

from fedfair_med.algorithms.base import precision_autocast
from fedfair_med.config import ConfigError, device_problem, normalise_precision

#: torch's documented setting for deterministic cuBLAS (the smaller ``:16:8`` is slower)
CUBLAS_WORKSPACE = ":4096:8"


class DeviceUnavailable(ConfigError):
    """The configured device or precision cannot be used on this machine (one line, no traceback)."""


def cuda_summary() -> str:
    """How torch sees CUDA here, for error messages: build and device count."""
    if torch.version.cuda is None:
        return f"this torch {torch.__version__} is built without CUDA"
    return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees "
            f"{torch.cuda.device_count()} CUDA device(s)")


def resolve_device(setting: str) -> torch.device:
    """The ``torch.device`` a ``device`` setting means on this machine, or DeviceUnavailable."""
    problem = device_problem(setting)
    if problem:
        raise DeviceUnavailable(problem)
    if setting == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if setting == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceUnavailable(f"device {setting!r}: CUDA is not available ({cuda_summary()}); "
                                "use device: cpu or auto")
    device = torch.device(setting)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceUnavailable(f"device {setting!r}: no such GPU ({cuda_summary()})")
    return device


@dataclass(frozen=True)
class Placement:
    """A site's resolved device and precision, and what they imply for its local loop."""

    device: torch.device
    precision: str = "32"
    setting: str = "auto"

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> ContextManager[Any]:
        """Mixed precision for forward passes (evaluation); a no-op context at precision 32."""
        return precision_autocast(self.device.type, self.precision)

    def describe(self) -> str:
        """e.g. ``device cpu (auto: no CUDA here)``."""
        where = str(self.device)
        if self.is_cuda:
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            where += f" ({torch.cuda.get_device_name(index)})"
        if self.setting == "auto":
            where += " (auto: CUDA present)" if self.is_cuda else " (auto: no CUDA here)"
        return f"device {where}, precision {self.precision}"


def placement(setting: str = "auto", precision: Any = "32") -> Placement:
    """Resolve ``device`` and check ``precision`` can run there; DeviceUnavailable if not."""
    device = resolve_device(setting)
    name = normalise_precision(precision)
    if name is None:
        raise DeviceUnavailable(f"precision: use 32, bf16 or fp16, got {precision!r}")
    if name == "fp16" and device.type != "cuda":
        raise DeviceUnavailable(
            "precision fp16 needs a CUDA device: on the CPU float16 kernels are few and slow, and "
            "fp16's narrow range needs loss scaling that bf16 avoids; use precision: bf16 or 32")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceUnavailable(f"precision bf16: {torch.cuda.get_device_name(device)} has no "
                                "bfloat16 support; use precision: fp16 or 32")
    return Placement(device=device, precision=name, setting=setting)


def apply_determinism(enabled: bool) -> None:
    """``deterministic: true``: torch's deterministic algorithms (cuBLAS workspace set too).

    On CPU every kernel this project uses is already deterministic, so this changes nothing
    there; on a GPU it trades speed for run-to-run equality (docs/configuration.md).
    """
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, Any]:
    """What a run will use besides the configuration: versions, GPUs, thread counts."""
    gpus = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpus": gpus,
        "cudnn": cudnn,
        "monai": _version("monai"),
        "openfl": _version("openfl"),
        "opacus": _version("opacus"),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
    }


def start_line(place: Placement) -> str:
    """The one line printed at the start of simulate / collaborator start (and by doctor)."""
    env = environment()
    cuda = f"CUDA {env['cuda_build']}" if env["cuda_build"] else "CPU-only build"
    return (f"{place.describe()}; torch {env['torch']} ({cuda}); threads "
            f"{env['torch_threads']} intra-op / {env['torch_interop_threads']} inter-op on "
            f"{env['cpu_count']} CPUs")


def write_site_record(out_dir: Any, site: str, place: Placement) -> None:
    """``device.json`` in a collaborator's run folder: what this site actually computed on."""
    import json
    from pathlib import Path

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"site": site, "device": str(place.device), "device_setting": place.setting,
              "precision": place.precision, **environment()}
    (folder / "device.json").write_text(json.dumps(record, indent=2) + "\n")
