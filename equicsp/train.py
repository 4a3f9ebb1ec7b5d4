"""`python -m equicsp.train`: kept as a module name; the command lives in equicsp.cli.train."""

from equicsp.cli.train import main

if __name__ == "__main__":
    main()
