"""`python -m workers.cli`: the same CLI as the `postback-relay` command."""

from workers.cli.main import main

main()
