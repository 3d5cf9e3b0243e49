"""Settings that commands also take as flags, and the Settings a command runs with."""

from __future__ import annotations

import argparse
import textwrap
import typing
from dataclasses import dataclass
from pathlib import Path

from auraserve.config import Settings, load_settings
from auraserve.observability.logs import configure_logging


@dataclass(frozen=True)
class SettingFlag:
    """A setting that a command also takes as a flag; the flag wins over the environment."""

    name: str  # the Settings field
    help: str
    commands: frozenset[str]
    parse: type = str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "AURASERVE_" + self.name.upper()


_ALL = frozenset({"serve", "worker", "generate", "keys", "credits", "db", "workers"})
_ENGINE = frozenset({"serve", "worker", "generate"})
_SERVICE = frozenset({"serve", "worker"})

SETTING_FLAGS: tuple[SettingFlag, ...] = (
    SettingFlag("data_dir", "data directory: the SQLite store and the media", _ALL, Path),
    SettingFlag(
        "model",
        "weights for every preset: a Hugging Face id, a local diffusers directory, one "
        ".safetensors or .gguf file (README, 'Bring your weights'), or 'tiny' (random test "
        "model that draws noise); empty: each preset's own weights",
        _ENGINE,
    ),
    SettingFlag(
        "components",
        "for a single weights file: where the tokenizer, scheduler and whatever the file "
        "lacks come from, a diffusers folder or hub id (default: the preset's, "
        "fal/AuraFlow-v0.3)",
        _ENGINE,
    ),
    SettingFlag("host", "listen address", frozenset({"serve"})),
    SettingFlag("port", "listen port", frozenset({"serve"}), int),
    SettingFlag(
        "workers",
        "in-process workers; 0 runs the API alone (no model loaded), for replicas in front "
        "of separate `auraserve worker` processes",
        frozenset({"serve"}),
        int,
    ),
    SettingFlag("device", "where the model runs", _ENGINE),
    SettingFlag("dtype", "weight precision; auto: bfloat16 on CUDA, float32 on the CPU", _ENGINE),
    SettingFlag(
        "offload",
        "move model parts to the GPU only while they run: less VRAM, slower",
        _ENGINE,
    ),
    SettingFlag(
        "engine_mode",
        "speed modes: a preset and/or field=value pairs, comma separated, e.g. 'fast,fp8=1'",
        _ENGINE,
    ),
    SettingFlag("max_rows", "images per transformer forward at most (bounds memory)", _ENGINE, int),
    SettingFlag("max_batch", "images a worker claims and runs together at most", _SERVICE, int),
    SettingFlag(
        "gpus",
        "one worker process per GPU, each pinned to its device: 'all' or indices such as "
        "0,1,3 (serve: the workers run as child processes beside the API)",
        _SERVICE,
    ),
    SettingFlag(
        "api_processes",
        "API processes on the one port (the in-process workers stay single, in the parent)",
        frozenset({"serve"}),
        int,
    ),
)


def _choices(name: str) -> tuple[str, ...] | None:
    annotation = Settings.model_fields[name].annotation
    if typing.get_origin(annotation) is typing.Literal:
        return tuple(str(a) for a in typing.get_args(annotation))
    return None


def _default_text(name: str) -> str:
    field = Settings.model_fields[name]
    if field.default_factory is not None or field.default in ("", None):
        return "none"
    return str(field.default)


def add_setting_flags(parser: argparse.ArgumentParser, command: str) -> None:
    for setting in SETTING_FLAGS:
        if command in setting.commands:
            parser.add_argument(
                setting.flag,
                dest=setting.name,
                type=setting.parse,
                choices=_choices(setting.name),
                help=f"{setting.help} (default {_default_text(setting.name)}; "
                f"environment {setting.env})",
            )


def other_settings_epilog(command: str) -> str:
    flagged = {s.name for s in SETTING_FLAGS if command in s.commands}
    others = ", ".join(
        f"AURASERVE_{name.upper()}" for name in Settings.model_fields if name not in flagged
    )
    return "\n".join(
        [
            "Every other setting comes from the environment, or from the TOML file that",
            "AURASERVE_CONFIG names (README, Configuration):",
            textwrap.fill(others, width=78, initial_indent="  ", subsequent_indent="  "),
        ]
    )


def given_flags(args: argparse.Namespace) -> dict[str, str]:
    """The settings this command line gave as flags: field name -> flag."""
    return {s.name: s.flag for s in SETTING_FLAGS if getattr(args, s.name, None) is not None}


def settings_from(args: argparse.Namespace) -> Settings:
    given = {s.name: getattr(args, s.name, None) for s in SETTING_FLAGS}
    # A bad value names the flag that gave it, not the environment variable it overrode.
    settings = load_settings(flags=given_flags(args), **given)
    configure_logging(settings.log_format, verbose=getattr(args, "verbose", False))
    return settings
