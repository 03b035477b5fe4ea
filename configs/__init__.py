"""The YAML configs, installed as the package data ``fvlm.configs`` (see ``fvlm.config_files``)."""
