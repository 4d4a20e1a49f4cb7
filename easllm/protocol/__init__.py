"""Wire formats, one module per API family; only these modules know field names."""
