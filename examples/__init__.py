"""Examples that use alig_fused; not part of the installed package."""
