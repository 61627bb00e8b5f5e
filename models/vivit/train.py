"""`python -m vivit.train`: the command-line tool of vivit.cli.train."""

from .cli.train import main

if __name__ == "__main__":
    main()
