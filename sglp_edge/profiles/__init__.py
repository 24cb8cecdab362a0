"""Device profiles: where a model must run and what it must achieve there (schema, discovery, merging)."""
