"""Test stand-in for Forge's ``modules_forge`` package (its presence marks Forge/reForge)."""
