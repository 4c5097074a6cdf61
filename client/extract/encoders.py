"""Patch encoders: one registry by name (timm style; a duplicate name is an error).

Every encoder is built offline and loaded from an explicit local weights file; nothing is ever
downloaded. ``random_init=True`` builds it with seeded random weights for tests and dry runs,
with a loud warning, and records ``weights_sha256 = "random-init"``.

Registered encoders (``list_encoders()``):
- ``resnet50_trunc``: torchvision ResNet50 up to layer3 + global average pool -> 1024 (CLAM);
  the input is the patch at its own size (256 px at 20x by default).
- ``uni_vit_l16``: timm ViT-L/16 as UNI publishes it (init_values 1e-5, dynamic image size) -> 1024.
- ``vit_base``, ``vit_small``, ``vit_tiny``: timm ViT-B/16, ViT-S/16, ViT-Ti/16 -> 768, 384, 192.
All use ImageNet normalisation; ViTs take 224 px inputs by default (any multiple of 16 works).
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from umeml.errors import UmemlError

__all__ = [
    "Encoder",
    "EncoderError",
    "EncoderSpec",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RANDOM_INIT",
    "get_encoder_spec",
    "list_encoders",
    "load_encoder",
    "load_weights_file",
    "NormalizedEncoder",
    "register_encoder",
    "sha256_file",
]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_INIT = "random-init"
RANDOM_INIT_SEED = 0


class EncoderError(UmemlError):
    """An encoder name is unknown, or its weights file is missing or does not fit it."""


@dataclass(frozen=True)
class EncoderSpec:
    """A registered encoder: how to build it and what it expects and returns."""

    name: str
    feature_dim: int
    build: Callable[[], nn.Module]
    input_size: int | None = None  # None: the patch as extracted; else resized to this side
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # checkpoint keys with these prefixes are not part of the encoder (e.g. a classifier head)
    ignore_prefixes: tuple[str, ...] = ()
    channels_last: bool = False
    description: str = ""


_REGISTRY: dict[str, EncoderSpec] = {}


def register_encoder(spec: EncoderSpec) -> EncoderSpec:
    """Add an encoder to the registry; registering a name twice raises :class:`ValueError`."""
    if spec.name in _REGISTRY:
        raise ValueError(f"encoder '{spec.name}' is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_encoders() -> list[str]:
    """Names of the registered encoders, sorted."""
    return sorted(_REGISTRY)


def get_encoder_spec(name: str) -> EncoderSpec:
    """The spec registered as ``name``; :class:`EncoderError` lists the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise EncoderError(f"unknown encoder '{name}'; registered: {', '.join(list_encoders())}") from None


# -- the encoders -------------------------------------------------------------------------------
class ResNet50Trunc(nn.Module):
    """torchvision ResNet50 up to layer3, then global average pooling: 1024 features (CLAM).

    Submodule names match torchvision's, so a torchvision ResNet50 state dict loads directly
    (its layer4 and fc are ignored).
    """

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import resnet50

        full = resnet50(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = full.conv1, full.bn1, full.relu, full.maxpool
        self.layer1, self.layer2, self.layer3 = full.layer1, full.layer2, full.layer3
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.pool(x), 1)


def _timm_vit(model_name: str, **kwargs: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(model_name, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs)

    return build


_VIT_IGNORE = ("head.",)

register_encoder(EncoderSpec(
    name="resnet50_trunc", feature_dim=1024, build=ResNet50Trunc, input_size=None,
    ignore_prefixes=("layer4.", "fc."), channels_last=True,
    description="torchvision ResNet50 to layer3 + average pool (CLAM), ImageNet weights file",
))
register_encoder(EncoderSpec(
    name="uni_vit_l16", feature_dim=1024, build=_timm_vit("vit_large_patch16_224", img_size=224, patch_size=16, init_values=1e-5),
    input_size=224, ignore_prefixes=_VIT_IGNORE,
    description="timm ViT-L/16 in UNI's configuration (UNI weights file, pytorch_model.bin)",
))
register_encoder(EncoderSpec(
    name="vit_base", feature_dim=768, build=_timm_vit("vit_base_patch16_224"), input_size=224,
    ignore_prefixes=_VIT_IGNORE, description="timm ViT-B/16",
))
register_encoder(EncoderSpec(
    name="vit_small", feature_dim=384, build=_timm_vit("vit_small_patch16_224"), input_size=224,
    ignore_prefixes=_VIT_IGNORE, description="timm ViT-S/16",
))
register_encoder(EncoderSpec(
    name="vit_tiny", feature_dim=192, build=_timm_vit("vit_tiny_patch16_224"), input_size=224,
    ignore_prefixes=_VIT_IGNORE, description="timm ViT-Ti/16 (small and fast: tests, benchmarks)",
))


# -- loading ------------------------------------------------------------------------------------
def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local ``.safetensors``, ``.pth``/``.pt``/``.bin`` file (tensors only).

    Unwraps ``{"state_dict": ...}``/``{"model": ...}`` checkpoints and a DataParallel ``module.``
    prefix. Never executes pickled code (``weights_only=True``).
    """
    path = Path(path)
    if not path.is_file():
        raise EncoderError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any parse failure means an unusable file
        raise EncoderError(f"cannot read weights file {path}: {err}") from err
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EncoderError(f"weights file {path} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


@dataclass
class Encoder:
    """A ready encoder: the network (eval mode), what it expects, and its weights' provenance."""

    spec: EncoderSpec
    model: nn.Module
    weights_sha256: str
    input_size: int | None
    random_init: bool = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def feature_dim(self) -> int:
        return self.spec.feature_dim


def _build(spec: EncoderSpec) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)  # random init is reproducible, so resumed runs agree
        return spec.build()


def _load_state(spec: EncoderSpec, state: dict[str, torch.Tensor], weights: str | Path) -> nn.Module:
    """Build ``spec``'s network from ``state``; every parameter and buffer must be in it.

    The network is first built on the meta device and the checkpoint's tensors assigned to it,
    which skips the (slow, wasted) random initialisation of large ViTs; if a tensor the
    checkpoint does not hold remains (a non-persistent buffer), it is built normally instead.
    """

    def load(model: nn.Module, assign: bool) -> nn.Module:
        try:
            result = model.load_state_dict(state, strict=False, assign=assign)
        except RuntimeError as err:
            raise EncoderError(f"weights file {weights} does not fit encoder '{spec.name}': {err}") from err
        if result.missing_keys or result.unexpected_keys:
            parts = []
            if result.missing_keys:
                parts.append(f"missing {len(result.missing_keys)} keys (e.g. {result.missing_keys[:5]})")
            if result.unexpected_keys:
                parts.append(f"unexpected {len(result.unexpected_keys)} keys (e.g. {result.unexpected_keys[:5]})")
            raise EncoderError(f"weights file {weights} does not fit encoder '{spec.name}': {'; '.join(parts)}")
        return model

    with torch.device("meta"):
        skeleton = spec.build()
    model = load(skeleton, assign=True)
    tensors = list(model.parameters()) + list(model.buffers())
    if any(t.is_meta for t in tensors):
        model = load(_build(spec), assign=False)
    return model.float()


def load_encoder(
    name: str, weights: str | Path | None = None, random_init: bool = False, input_size: int | None = None
) -> Encoder:
    """Build encoder ``name`` and load ``weights`` (a local file); ``random_init`` instead of weights.

    Exactly one of ``weights`` and ``random_init`` must be given. Checkpoint keys the encoder
    does not use (a classifier head, ResNet50's layer4) are ignored; any other missing or
    unexpected key, or a shape mismatch, raises :class:`EncoderError`.
    """
    spec = get_encoder_spec(name)
    if weights is not None and random_init:
        raise EncoderError("give either a weights file or random_init, not both")
    if weights is None and not random_init:
        raise EncoderError(
            f"encoder '{name}' needs a local weights file (--weights FILE); nothing is downloaded. "
            "Use --random-init only for tests: its features are meaningless."
        )
    if input_size is not None and input_size < 16:
        raise EncoderError(f"input size must be at least 16 pixels, got {input_size}")
    if random_init:
        model = _build(spec)
        banner = (
            f"RANDOM-INIT ENCODER: '{name}' has random weights; its features are meaningless for "
            "any model. Use this for tests and dry runs only, never for a study."
        )
        log.warning("!" * 20 + " " + banner + " " + "!" * 20)
        warnings.warn(banner, UserWarning, stacklevel=2)
        sha = RANDOM_INIT
    else:
        assert weights is not None
        state = load_weights_file(weights)
        state = {k: v for k, v in state.items() if not k.startswith(spec.ignore_prefixes)}
        model = _load_state(spec, state, weights)
        sha = sha256_file(weights)
    model.eval().requires_grad_(False)
    return Encoder(
        spec=spec, model=model, weights_sha256=sha, input_size=input_size or spec.input_size, random_init=random_init
    )


class NormalizedEncoder(nn.Module):
    """Takes uint8 N x H x W x 3 patches, scales and normalises them, returns N x D features."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.model = encoder.model
        self.register_buffer("mean", torch.tensor(encoder.spec.mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("inv_std", 1.0 / (torch.tensor(encoder.spec.std).view(1, 3, 1, 1) * 255.0), persistent=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # NHWC uint8 -> NCHW float (a channels-last view: no copy of the layout)
        x = patches.permute(0, 3, 1, 2).float()
        x = (x - self.mean) * self.inv_std
        return self.model(x)
