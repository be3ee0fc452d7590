"""Theory of gradient propagation, computed: mean field, Jacobian spectra, RNN dynamics."""
