"""The TOML config: model, field parsers, loading and validation (pure; every error located).

The package is the config's public face: `from xknock.controller.config import
parse_config, ConfigError, Step`. The [spa] and time-based keys are validated
in spa_config.py and totp_config.py."""

from .load import (
    BAN_KEYS, BAN_SCOPES, DEFAULT_BAN_FOR_NS, DEFAULT_BAN_WITHIN_NS, DEFAULT_HOOK_MAX_RUNNING, DEFAULT_HOOK_TIMEOUT_NS,
    DEFAULT_IDLE_TIMEOUT_NS, DEFAULT_OPEN_FOR_NS, DEFAULT_PATH, DEFAULT_STEP_TIMEOUT_NS, DURATION_HINT, FILTER_KEYS,
    HOOK_EXAMPLE, HOOKS_KEYS, LIST_KEYS, MAX_BAN_AFTER, MAX_DURATION_NS, MAX_HOOK_MAX_RUNNING, MAX_HOOK_TIMEOUT_NS,
    MAX_LIST_SOURCES, MAX_STEP_TIMEOUT_NS, NAME_MAX_BYTES, NAME_PATTERN, NS_PER_UNIT, OPENABLE_PROTOS,
    PROC_NET_LISTENING, RESERVED_TABLES, SEQUENCE_KEYS, SHORT_SEQUENCE_STEPS, STEP_PROTOS, TOP_LEVEL_KEYS, Ban,
    Config, ConfigError, Hooks, Sequence, Step, config_hash, format_duration, listening_ports, load_config,
    parse_config, parse_duration, parse_step,
)
