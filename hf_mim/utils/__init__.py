"""Small helpers every tooling subpackage (data, training, hub) may use. Tooling zone."""
