"""Small helpers with no dependency on the rest of bmd_d2 (the bottom layer)."""
