"""Test support: tiny models and adapters the tests build (not shipped with the packages)."""
