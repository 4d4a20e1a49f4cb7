"""Where a service's replicas run: base.py is the interface; local.py (processes on this machine)
and ray.py (Ray Serve) implement it."""
