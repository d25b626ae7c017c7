"""Test stand-in for the Forge/reForge package of the same name (see tests/forge/conftest.py)."""
