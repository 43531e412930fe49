"""Registration by optimisation, without a trained network: affine (rigid, similarity, full)
in world coordinates, deformable (diffeomorphic) on the fixed grid, and field-level instance
optimisation (refinement) of a given field such as a network's prediction.
"""
from regkit.registration.affine import AffineRegistration as AffineRegistration  # the affine stage
