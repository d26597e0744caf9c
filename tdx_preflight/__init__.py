"""tdx-preflight: may this Intel TDX host kexec now, and why (not)."""

__version__ = "0.1.0"
