"""`python -m vivit.predict`: the command-line tool of vivit.cli.predict."""

from .cli.predict import main

if __name__ == "__main__":
    main()
