"""`python -m equicsp.data`: kept as a module name; the command lives in equicsp.cli.data."""

from equicsp.cli.data import main

if __name__ == "__main__":
    main()
