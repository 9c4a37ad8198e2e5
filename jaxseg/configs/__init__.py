"""Here rather than beside the package, so an installed jaxseg has its configs:
`--config=NAME` loads NAME.py from this folder (`cli.config_file`)."""
