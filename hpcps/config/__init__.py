from hpcps.config.load import Config, default_config, load_config  # noqa: F401
