"""`python -m equicsp.sample`: kept as a module name; the command lives in equicsp.cli.sample."""

from equicsp.cli.sample import main

if __name__ == "__main__":
    main()
