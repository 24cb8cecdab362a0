"""Model adapters: which layer units a model has, which can go, and how to remove them."""
