"""The command line: a thin Typer layer over the library (charlm.lm, charlm.qa). Only this package imports typer and rich."""
