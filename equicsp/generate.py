"""`python -m equicsp.generate`: kept as a module name; the command lives in equicsp.cli.generate."""

from equicsp.cli.generate import main

if __name__ == "__main__":
    main()
