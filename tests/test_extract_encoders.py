"""Encoder registry: every registered encoder builds and has its declared output; weights come
only from local files (checked with the network disabled)."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("torchvision")

from bench._slides import disable_network  # noqa: E402
from umeml.client.extract.encoders import (  # noqa: E402
    RANDOM_INIT,
    EncoderError,
    EncoderSpec,
    NormalizedEncoder,
    get_encoder_spec,
    list_encoders,
    load_encoder,
    register_encoder,
    sha256_file,
)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    disable_network(monkeypatch)


@pytest.fixture(scope="module")
def tiny():
    """A random-init ViT-Ti built once (its random initialisation is the slow part)."""
    with pytest.warns(UserWarning, match="RANDOM-INIT"):
        return load_encoder("vit_tiny", random_init=True, input_size=32)


def test_network_is_really_off():
    import socket

    with pytest.raises(RuntimeError, match="network access"):
        socket.create_connection(("127.0.0.1", 9))


@pytest.mark.parametrize("name", list_encoders())
def test_every_registered_encoder_builds_with_declared_dim(name):
    spec = get_encoder_spec(name)
    size = spec.input_size or 256
    with torch.device("meta"):  # no memory, no weights: just the architecture and shapes
        model = spec.build()
        out = model(torch.zeros(2, 3, size, size))
    assert tuple(out.shape) == (2, spec.feature_dim)


def test_registry_rejects_duplicates_and_unknown_names():
    assert {"resnet50_trunc", "uni_vit_l16", "vit_small", "vit_tiny"} <= set(list_encoders())
    with pytest.raises(ValueError, match="already registered"):
        register_encoder(EncoderSpec(name="vit_tiny", feature_dim=1, build=torch.nn.Identity))
    with pytest.raises(EncoderError, match="unknown encoder 'nope'.*resnet50_trunc"):
        get_encoder_spec("nope")


def test_weights_are_required_unless_random_init(tmp_path):
    with pytest.raises(EncoderError, match="local weights file"):
        load_encoder("vit_tiny")
    with pytest.raises(EncoderError, match="does not exist"):
        load_encoder("vit_tiny", weights=tmp_path / "missing.pth")
    with pytest.raises(EncoderError, match="not both"):
        load_encoder("vit_tiny", weights=tmp_path / "x.pth", random_init=True)


def test_random_init_warns_loudly_and_is_reproducible(tiny):
    a = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = load_encoder("vit_tiny", random_init=True, input_size=32)
    assert a.weights_sha256 == RANDOM_INIT and a.random_init
    x = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    with torch.inference_mode():
        fa, fb = NormalizedEncoder(a)(x), NormalizedEncoder(b)(x)
    assert fa.shape == (3, 192) and torch.equal(fa, fb)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_file_round_trip_and_checksum(tmp_path, suffix, tiny):
    src = tiny
    path = tmp_path / f"w{suffix}"
    # weights that differ from the seeded random init, so only loading the file can give them
    state = {k: (v + 0.01 if v.is_floating_point() else v).contiguous() for k, v in src.model.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)  # wrapped + DataParallel
    enc = load_encoder("vit_tiny", weights=path, input_size=32)
    assert enc.weights_sha256 == sha256_file(path) and len(enc.weights_sha256) == 64
    loaded = enc.model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    x = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    with torch.inference_mode():
        out = NormalizedEncoder(enc)(x)
    assert out.shape == (2, 192) and torch.isfinite(out).all()


def test_resnet50_trunc_loads_a_full_torchvision_checkpoint(tmp_path):
    from torchvision.models import resnet50

    full = resnet50(weights=None)
    path = tmp_path / "resnet50.pth"
    torch.save(full.state_dict(), path)  # includes layer4 and fc, which the truncated model ignores
    enc = load_encoder("resnet50_trunc", weights=path)
    assert torch.equal(enc.model.layer3[0].conv1.weight, full.layer3[0].conv1.weight)
    x = torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8)
    with torch.inference_mode():
        assert NormalizedEncoder(enc)(x).shape == (1, 1024)


def test_mismatched_weights_are_refused(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, path)
    with pytest.raises(EncoderError, match="does not fit encoder 'vit_tiny'"):
        load_encoder("vit_tiny", weights=path)
    path.write_bytes(b"garbage")
    with pytest.raises(EncoderError, match="cannot read weights file"):
        load_encoder("vit_tiny", weights=path)
