"""Exceptions raised and warnings emitted by the measurements."""


class NonFiniteError(ArithmeticError):
    """A loss, gradient or Hessian-vector product was NaN or infinite.

    Raised by every measurement so that callers (our callbacks included) can catch this
    one type, skip the measurement and let training go on.
    """


class OnceDifferentiableError(RuntimeError):
    """A Hessian-vector product would go through a custom ``autograd.Function`` whose
    backward is marked ``@once_differentiable``, so its second derivatives would be left
    out without an error."""


class AsymmetricOperatorError(ArithmeticError):
    """An operator taken as symmetric gave products that are not: its eigenvalues would be
    wrong. A Hessian's products are symmetric unless the loss runs a double backward that
    does not differentiate its backward: one written by hand for a custom
    ``autograd.Function`` (as extensions supporting double backward have), or a kernel's,
    as embedding's under ``scale_grad_by_freq`` was."""


class PeerFailureError(RuntimeError):
    """A measurement failed on another process of ``torch.distributed``.

    Every process raises (the failing one its own error, the others this one, naming the
    failing rank and its error), so that none is left waiting in a collective the failing
    one never reaches.
    """


class NondeterministicLossError(RuntimeError):
    """A batch's loss changed between forward passes at the same weights.

    Products over several batches re-run the forward pass of each, and sharpness and loss
    slices compare losses of different passes; a loss that draws from a random source the
    measurement can neither seed nor hold still (a generator created inside it) makes
    every product one of a different matrix, and every difference one of draws.
    """


class ReducedPrecisionWarning(UserWarning):
    """A measurement's loss ran modules in float16 or bfloat16.

    The measurements turn off the autocast that mixed-precision training enters around
    them, but not one entered inside the user's code: the products are then computed at
    half precision, and eigenvalues near zero (λ_min, the saddle label) are the first to
    suffer.
    """
