"""The command-line entry points; nothing in the package imports them."""
