"""GMVAE (issue 14): does a generative latent help a cell type classifier (the latent_inputs study)."""
