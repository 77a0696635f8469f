"""Test helpers shared by unit and integration tests (local fake servers and the like)."""
