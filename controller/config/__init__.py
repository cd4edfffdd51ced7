"""The TOML config: model, field parsers, loading and validation (pure; every error located)."""
