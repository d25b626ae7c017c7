"""Test stand-in for the WebUI ``modules`` package, Forge flavour (see tests/forge/conftest.py)."""
