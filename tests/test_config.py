"""Settings: environment, TOML file, eager validation naming the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from auraserve.config import ConfigError, load_settings


def test_toml_file_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "auraserve.toml"
    config.write_text(
        "port = 9123\nmax_batch = 8\n"
        '[presets.my-model]\nweights = "/models/auraflow"\nwidth = 768\nheight = 768\nsteps = 30\n'
    )
    monkeypatch.setenv("AURASERVE_CONFIG", str(config))
    monkeypatch.setenv("AURASERVE_MAX_BATCH", "2")  # the environment wins over the file
    monkeypatch.setenv("AURASERVE_DEFAULT_PRESET", "my-model")
    settings = load_settings()
    assert settings.port == 9123
    assert settings.max_batch == 2
    assert settings.presets["my-model"].steps == 30
    assert settings.weights_for("my-model") == "/models/auraflow"


@pytest.mark.parametrize(
    ("env", "value", "needle"),
    [
        ("AURASERVE_PORT", "70000", "AURASERVE_PORT"),
        ("AURASERVE_DEFAULT_PRESET", "nope", "default_preset"),
        ("AURASERVE_DATABASE_URL", "mysql://x", "database_url"),
        ("AURASERVE_DEVICE", "tpu", "AURASERVE_DEVICE"),
        ("AURASERVE_WARMUP_SIZES", "100x100", "AURASERVE_WARMUP_SIZES"),
    ],
)
def test_bad_values_name_the_setting(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, needle: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert needle in str(err.value)
