"""Exceptions raised by the measurements."""


class NonFiniteError(ArithmeticError):
    """A loss, gradient or Hessian-vector product was NaN or infinite.

    Raised by every measurement so that callers (our callbacks included) can catch this
    one type, skip the measurement and let training go on.
    """


class PeerFailureError(RuntimeError):
    """A measurement failed on another process of ``torch.distributed``.

    Every process raises (the failing one its own error, the others this one, naming the
    failing rank and its error), so that none is left waiting in a collective the failing
    one never reaches.
    """
