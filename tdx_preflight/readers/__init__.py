"""Readers: file formats to typed facts. No policy here; every read goes through Host,
except procinfo's: the live process table, read through psutil."""
