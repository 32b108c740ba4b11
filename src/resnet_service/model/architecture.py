"""Network builders: fp32 torchvision ResNets and their quantizable (fusable) twins."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Final

import torch
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.quantization import resnet18 as qresnet18
from torchvision.models.quantization import resnet50 as qresnet50

from resnet_service.core.errors import BundleInvalid
from resnet_service.cpus import vnni_in_effect
from resnet_service.model.manifest import ARCHITECTURES

_FP32: Final[dict[str, Callable[..., nn.Module]]] = {"resnet18": resnet18, "resnet50": resnet50}
_QUANTIZABLE: Final[dict[str, Callable[..., nn.Module]]] = {
    "resnet18": qresnet18,
    "resnet50": qresnet50,
}
#: x86 is the engine for this CPU family (fbgemm + oneDNN kernels); measured ~30% faster
#: than plain fbgemm here.
QUANTIZED_ENGINE: Final = "x86"


def _check(architecture: str) -> None:
    if architecture not in _FP32 or architecture not in ARCHITECTURES:
        raise BundleInvalid(
            f"unknown architecture {architecture!r}; supported: {', '.join(ARCHITECTURES)}"
        )


def build_fp32(architecture: str, num_classes: int) -> nn.Module:
    """An untrained fp32 network in eval mode."""
    _check(architecture)
    return _FP32[architecture](weights=None, num_classes=num_classes).eval()


@contextmanager
def quiet_quantization_warnings() -> Iterator[None]:
    """Silence torch's deprecation notices for eager-mode quantization (still the fastest
    int8 path here); only used during single-threaded model build at start-up."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor")
        warnings.filterwarnings("ignore", message=r"TypedStorage is deprecated")
        warnings.filterwarnings("ignore", message=r"Please use quant_min and quant_max")
        # Loading a bundle calibrated for a VNNI host (its skeleton names its qconfig).
        warnings.filterwarnings("ignore", message=r"Default qconfig of oneDNN backend")
        yield


def host_qconfig() -> str:
    """The qconfig for this CPU: oneDNN's 8-bit activations where it has VNNI (exact u8 x s8
    dot products), else the x86 qconfig's 7-bit activations: without VNNI the AVX2 kernels sum
    u8 x s8 pairs into saturating int16 (``vpmaddubsw``), which 8-bit activations overflow;
    torch warns exactly about that. Read from ``cpus`` (honouring ``ONEDNN_MAX_CPU_ISA``, which
    the oneDNN kernels obey too), so a capped build is the one a host of that level makes."""
    return "onednn" if vnni_in_effect() else "x86"


def select_quantized_engine() -> None:
    """Use the x86 quantized engine (fails loudly if this torch build lacks it)."""
    if QUANTIZED_ENGINE not in torch.backends.quantized.supported_engines:
        raise RuntimeError(f"this torch build has no {QUANTIZED_ENGINE} quantized engine")
    torch.backends.quantized.engine = QUANTIZED_ENGINE


def build_prepared(
    architecture: str, num_classes: int, state_dict: dict[str, torch.Tensor] | None, qconfig: str
) -> nn.Module:
    """A quantizable network with conv+bn+relu fused and observers attached (eval mode)."""
    _check(architecture)
    from torch.ao.quantization import get_default_qconfig, prepare

    select_quantized_engine()
    model = _QUANTIZABLE[architecture](weights=None, quantize=False, num_classes=num_classes)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model.eval()
    with quiet_quantization_warnings():
        model.fuse_model(is_qat=False)  # type: ignore[operator]
        model.qconfig = get_default_qconfig(qconfig)  # type: ignore[no-untyped-call]
        prepare(model, inplace=True)  # type: ignore[no-untyped-call]
    return model


def convert_prepared(model: nn.Module) -> nn.Module:
    """Observers -> int8 modules."""
    from torch.ao.quantization import convert

    with quiet_quantization_warnings():
        convert(model, inplace=True)  # type: ignore[no-untyped-call]
    return model.eval()


def build_int8_skeleton(architecture: str, num_classes: int, qconfig: str) -> nn.Module:
    """An int8 network ready for ``load_state_dict`` of a saved int8 state."""
    model = build_prepared(architecture, num_classes, None, qconfig)
    # One tiny pass so observers hold values: convert() then needs no fake statistics.
    with torch.inference_mode():
        model(torch.zeros(1, 3, 64, 64))
    return convert_prepared(model)
