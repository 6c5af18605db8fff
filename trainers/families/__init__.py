"""Model families: one class per family or lineage, owning what differs between them."""
