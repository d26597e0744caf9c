"""Readers: file formats to typed facts. No policy here; every read goes through Host."""
