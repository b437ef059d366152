"""`python -m personavec.cli`: the same as the `personavec` command."""

from . import main

if __name__ == "__main__":
    main()
