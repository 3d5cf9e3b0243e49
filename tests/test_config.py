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
        ("AURASERVE_PORT", "70000", "AURASERVE_PORT=70000"),
        ("AURASERVE_DEFAULT_PRESET", "nope", "AURASERVE_DEFAULT_PRESET=nope"),
        ("AURASERVE_DATABASE_URL", "mysql://x", "AURASERVE_DATABASE_URL"),
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


def test_errors_name_the_flag_else_the_variable_else_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "auraserve.toml"
    config.write_text("lease_seconds = -1\nportt = 1\n[presets.mine]\nweights = 'w'\nsteps = 'x'\n")
    monkeypatch.setenv("AURASERVE_CONFIG", str(config))
    monkeypatch.setenv("AURASERVE_PORT", "8000")  # valid: the flag below is what is wrong
    with pytest.raises(ConfigError) as err:
        load_settings(flags={"port": "--port"}, port=70000)
    message = str(err.value)
    assert "--port 70000:" in message and "AURASERVE_PORT" not in message
    assert f"lease_seconds in {config}" in message
    assert f"presets.mine.steps in {config}" in message
    assert "portt" in message and "did you mean port?" in message


def test_heartbeat_and_preset_errors_name_their_own_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AURASERVE_HEARTBEAT_SECONDS", "60")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "AURASERVE_HEARTBEAT_SECONDS=60: must be shorter than lease_seconds" in str(err.value)


def test_a_settings_file_that_is_not_toml_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "auraserve.toml"
    config.write_text("port = \n")
    monkeypatch.setenv("AURASERVE_CONFIG", str(config))
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert f"AURASERVE_CONFIG={config}" in str(err.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgres://u:p@db:5432/aura",
        "postgresql://u:p@db:5432/aura",
        "postgres+psycopg://u:p@db:5432/aura",
    ],
)
def test_postgres_urls_mean_postgresql(url: str) -> None:
    settings = load_settings(database_url=url)
    assert settings.resolved_database_url == "postgresql+psycopg://u:p@db:5432/aura"


def test_secrets_never_appear_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AURASERVE_DATABASE_URL", "mysql://user:hunter2@db/x")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "AURASERVE_DATABASE_URL" in str(err.value) and "hunter2" not in str(err.value)


def test_models_file_replaces_the_presets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text(
        '[models.pony-v7]\nweights = "/m/pony.safetensors"\nlora_dir = "/m/pony-loras"\n'
        "price_per_image = 150\n\n"
        '[models.aura-q4]\nweights = "/m/aura-Q4_K.gguf"\ncomponents = "/m/AuraFlow"\n'
    )
    monkeypatch.setenv("AURASERVE_MODELS_FILE", str(models))
    settings = load_settings()
    assert list(settings.presets) == ["pony-v7", "aura-q4"]
    assert settings.default_preset == "pony-v7"
    assert settings.components_for("pony-v7") == "fal/AuraFlow-v0.3"
    assert settings.components_for("aura-q4") == "/m/AuraFlow"
    assert settings.presets["pony-v7"].lora_dir == Path("/m/pony-loras")
    models.write_text("[models]\n")
    with pytest.raises(ConfigError, match=r"AURASERVE_MODELS_FILE.*no \[models.<id>\] tables"):
        load_settings()
    monkeypatch.setenv("AURASERVE_MODELS_FILE", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match=r"AURASERVE_MODELS_FILE.*cannot read"):
        load_settings()


def test_the_parallel_timeout_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AURASERVE_PARALLEL_TIMEOUT_S", "60")
    assert load_settings().parallel_timeout_s == 60.0
    monkeypatch.setenv("AURASERVE_PARALLEL_TIMEOUT_S", "0")
    with pytest.raises(ConfigError, match="AURASERVE_PARALLEL_TIMEOUT_S"):
        load_settings()


def test_the_outbound_policy_is_built_once_from_the_webhook_settings() -> None:
    settings = load_settings(webhook_allow_hosts=["127.0.0.1", "localhost"])
    policy = settings.outbound
    assert policy is settings.outbound is settings.webhooks.outbound
    assert policy.addresses.host_allowed("localhost") and not policy.allow_http
    assert settings.model_copy().outbound is policy
    # A copy with other values builds its own; the original keeps its policy.
    opened = settings.model_copy(update={"webhook_allow_hosts": [], "webhook_allow_http": True})
    assert opened.outbound.allow_http and not opened.outbound.addresses.host_allowed("localhost")
    assert settings.outbound is policy
