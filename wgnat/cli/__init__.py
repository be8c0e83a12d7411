"""The console scripts: `wgnat-server` and `wgnat-client` (daemons.py, thin
wrappers over the taps twistd runs too) and `wgnat` (wgnat.py: asks a running
daemon over its status socket and prints what it says)."""
