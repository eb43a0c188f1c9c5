"""Tools for developing nanoray on one machine: finding Ray's processes to kill in fault tests (procs.py)."""
