"""`python -m equicsp.evaluate`: kept as a module name; the command lives in equicsp.cli.evaluate."""

from equicsp.cli.evaluate import main

if __name__ == "__main__":
    main()
