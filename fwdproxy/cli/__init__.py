"""The command line (a leaf: nothing in the package imports it) and its offline tools."""
