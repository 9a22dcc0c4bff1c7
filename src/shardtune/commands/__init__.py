"""One module per `shardtune` subcommand, each a main(argv) -> exit code; cli.py is their
table. Commands import recipes and the library; nothing in the library imports them."""
