"""The TOML config: model, field parsers, loading and validation (pure; every error located).

The package is the config's public face: `from xknock.controller.config import
parse_config, ConfigError, Step`. Inside: model.py (limits, defaults, the
frozen dataclasses; imports nothing of the config's own), fields.py (one
value's parser each, shared by the parts), spa_config.py ([spa] and
[[spa.user]]), totp_config.py (time-based sequences' keys), load.py (the
whole file: load_config, parse_config, the checks across tables, config_hash)."""

from .fields import format_duration, parse_duration, parse_step
from .load import config_hash, listening_ports, load_config, parse_config
from .model import (
    BAN_KEYS, BAN_SCOPES, DEFAULT_BAN_FOR_NS, DEFAULT_BAN_WITHIN_NS, DEFAULT_HOOK_MAX_RUNNING, DEFAULT_HOOK_TIMEOUT_NS,
    DEFAULT_IDLE_TIMEOUT_NS, DEFAULT_OPEN_FOR_NS, DEFAULT_PATH, DEFAULT_STEP_TIMEOUT_NS, DURATION_HINT, FILTER_KEYS,
    HOOK_EXAMPLE, HOOKS_KEYS, LIST_KEYS, MAX_BAN_AFTER, MAX_DURATION_NS, MAX_HOOK_MAX_RUNNING, MAX_HOOK_TIMEOUT_NS,
    MAX_LIST_SOURCES, MAX_STEP_TIMEOUT_NS, NAME_MAX_BYTES, NAME_PATTERN, NS_PER_UNIT, OPENABLE_PROTOS,
    PROC_NET_LISTENING, RESERVED_TABLES, SEQUENCE_KEYS, SHORT_SEQUENCE_STEPS, STEP_PROTOS, TOP_LEVEL_KEYS, Ban,
    Config, ConfigError, Hooks, Sequence, Step, Totp,
)
