"""Every shipped yaml preset loads into its config dataclass (names and types checked by omegaconf)."""

import pytest

from vidlatent.config import DiTConfig, TextConfig, VAEConfig, list_presets, load_config

MODEL_KINDS = {"vae": VAEConfig, "dit": DiTConfig, "text": TextConfig}


@pytest.mark.parametrize(
    ("kind", "name"), [(kind, name) for kind in MODEL_KINDS for name in list_presets(kind)]
)
def test_model_preset_loads(kind, name):
    cfg = load_config(MODEL_KINDS[kind], kind, name)
    assert isinstance(cfg, MODEL_KINDS[kind])


def test_every_kind_has_presets():
    for kind in MODEL_KINDS:
        assert list_presets(kind), kind


def test_bad_override_names_the_key():
    with pytest.raises(ValueError, match="no_such_field"):
        load_config(DiTConfig, "dit", "tiny", overrides=["no_such_field=1"])
