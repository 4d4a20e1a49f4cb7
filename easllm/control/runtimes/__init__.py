"""Where replicas run: `local` (processes on this machine)."""
