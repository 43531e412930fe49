"""Registration by optimisation, without a trained network: affine (rigid, similarity, full)
in world coordinates, deformable (diffeomorphic) on the fixed grid, and field-level instance
optimisation (refinement) of a given field such as a network's prediction.
"""
from regkit.registration.affine import AffineRegistration
from regkit.registration.deformable import DeformableRegistration, invert_flow
from regkit.registration.pipeline import Pipeline, list_presets, load_preset, plot_loss_curves
from regkit.registration.refine import Refine
from regkit.registration.result import AffineResult, DeformableResult, RegistrationResult, StageRecord
from regkit.registration.smoothing import gaussian_smooth

__all__ = ["AffineRegistration", "DeformableRegistration", "Refine", "Pipeline", "load_preset", "list_presets", "plot_loss_curves",
           "invert_flow", "gaussian_smooth", "AffineResult", "DeformableResult", "RegistrationResult", "StageRecord"]
