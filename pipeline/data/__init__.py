"""Data in and out: volumes in RAS, storage paths and URIs, the SPIDER catalog, label maps, input
checks, table contracts, checkpoint folders and the synthetic cohort. Imports no model."""
