"""The console: named LLM services (spec, registry, replicas, gateway) behind one port."""
