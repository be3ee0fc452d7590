"""Theory of gradient propagation, computed: mean field, Jacobian spectra, RNN dynamics.

Importing this package needs only torch and numpy. scipy (the ``gradwatch[theory]``
extra) is imported when a function needs it, e.g. :func:`critical_sigma_w2`.
"""

from .activations import KNOWN_ACTIVATIONS, Activation, resolve_activation
from .critical_init import CriticalInit, critical_init, find_activation
from .lyapunov import lyapunov_spectrum, mean_field_lyapunov
from .meanfield import MeanField, PhaseDiagram, critical_sigma_w2, depth_scale, phase_diagram
from .rnn import RNNStep, gradient_by_lag, rnn_step, spectral_radius

__all__ = [
    # mean field (meanfield.py, critical_init.py, activations.py)
    "Activation",
    "CriticalInit",
    "KNOWN_ACTIVATIONS",
    "MeanField",
    "PhaseDiagram",
    "critical_init",
    "critical_sigma_w2",
    "depth_scale",
    "find_activation",
    "phase_diagram",
    "resolve_activation",
    # recurrent networks (rnn.py, lyapunov.py)
    "RNNStep",
    "gradient_by_lag",
    "lyapunov_spectrum",
    "mean_field_lyapunov",
    "rnn_step",
    "spectral_radius",
]
