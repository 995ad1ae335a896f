"""The disc shape autoencoder: model, training (Ray Train) and encoding every disc (Ray Data)."""
