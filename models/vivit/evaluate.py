"""`python -m vivit.evaluate`: the command-line tool of vivit.cli.evaluate."""

from .cli.evaluate import main

if __name__ == "__main__":
    main()
