"""One module per `seedlm` subcommand: `add_arguments(parser)` and `run(args) -> int`."""
